# sara-megatron on NVIDIA's PyTorch container, which carries CUDA, NCCL, Transformer Engine and apex.
# Build with the NGC PyTorch image as the base, e.g. its 25.04-py3 tag:
#   docker build --build-arg BASE_IMAGE=<NGC pytorch image>:25.04-py3 -t sara-megatron .
ARG BASE_IMAGE
FROM ${BASE_IMAGE}

WORKDIR /workspace/sara-megatron
COPY setup.py README.md ./
COPY sara_megatron ./sara_megatron
COPY kernels ./kernels
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks

# The container's torch, Transformer Engine and apex stay as they are: install our package and the
# pure-Python dependencies only (with the specifiers of setup.py; tests/test_packaging.py keeps the two in step).
RUN pip install --no-cache-dir "megatron-core==0.16.1" "transformers>=4.56,<5.25" safetensors pyyaml "pydantic>=2" psutil \
        einops tensorboard datasets "openai>=1.40" aiohttp tqdm lingua-language-detector scipy matplotlib \
    && pip install --no-cache-dir --no-deps -e . \
    && python -c "import sara_megatron.kernels, megatron.core, transformer_engine"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1
CMD ["python", "tools/train.py", "--help"]
