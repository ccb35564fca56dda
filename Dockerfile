# sara-megatron on NVIDIA's PyTorch container (Python 3.12), which carries CUDA, NCCL, Transformer
# Engine and apex. The default tag below or any newer one (Python 3.12):
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3 -t sara-megatron .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
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
RUN pip install --no-cache-dir "megatron-core>=0.16.1,<0.20" "transformers>=4.56" safetensors pyyaml "pydantic>=2" psutil \
        einops tensorboard datasets "openai>=1.40" aiohttp tqdm lingua-language-detector scipy matplotlib \
    && pip install --no-cache-dir --no-deps -e . \
    && python -c "import sara_megatron.kernels, megatron.core, transformer_engine"

ENV CUDA_DEVICE_MAX_CONNECTIONS=1
CMD ["python", "tools/train.py", "--help"]
