"""The Dockerfile and the SLURM scripts agree with setup.py and with each other (nothing here can be
built without Docker and a cluster, so drift between them is what can be checked)."""

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# NVIDIA's PyTorch container brings these (CUDA builds); the Dockerfile must not replace them.
CONTAINER_PROVIDED = {"torch", "triton", "numpy"}


def _install_requires() -> dict[str, str]:
    """Requirement name -> full requirement string, read from setup.py's setup() call."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    (requires,) = [kw.value for kw in call.keywords if kw.arg == "install_requires"]
    strings = [ast.literal_eval(element) for element in requires.elts]
    return {re.split(r"[<>=!~\[ ]", s, maxsplit=1)[0].lower(): s for s in strings}


def _dockerfile_run_commands() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line[len("RUN "):] for line in text.splitlines() if line.startswith("RUN ")]


def _pip_installed_by_dockerfile() -> dict[str, str]:
    found = {}
    for command in _dockerfile_run_commands():
        for part in command.split("&&"):
            words = shlex.split(part)
            if words[:2] != ["pip", "install"] or "-e" in words:
                continue
            for word in words[2:]:
                if not word.startswith("-"):
                    found[re.split(r"[<>=!~\[ ]", word, maxsplit=1)[0].lower()] = word
    return found


def test_dockerfile_installs_what_setup_py_requires_except_the_containers_own():
    required = _install_requires()
    installed = _pip_installed_by_dockerfile()
    assert CONTAINER_PROVIDED <= set(required)
    assert set(installed) == set(required) - CONTAINER_PROVIDED
    for name, spec in installed.items():
        assert spec == required[name], f"Dockerfile pins {spec}, setup.py requires {required[name]}"
    # The package itself goes in without dependencies, so pip never touches the container's torch.
    assert any("pip install --no-cache-dir --no-deps -e ." in c for c in _dockerfile_run_commands())


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.sbatch")), ids=lambda p: p.name)
def test_slurm_scripts_run_the_dockerfiles_image(script):
    dockerfile = (ROOT / "Dockerfile").read_text()
    text = script.read_text()
    (workdir,) = re.findall(r"^WORKDIR (\S+)", dockerfile, flags=re.M)
    (tag,) = re.findall(r"docker build .* -t (\S+) \.", dockerfile)
    (image,) = re.findall(r"^IMAGE=\$\{IMAGE:-(\S+)\}", text, flags=re.M)
    assert image.split(":")[0] == tag
    assert '--container-image="$IMAGE"' in text
    # One rank that dies ends the step (the others would wait in a collective); IMAGE=none runs
    # without pyxis/enroot (tests/test_slurm.py runs the recipe that way).
    assert "srun --kill-on-bad-exit=1 " in text and '[ "$IMAGE" = none ]' in text
    assert f"--container-workdir={workdir}" in text
    (config,) = re.findall(r"^CONFIG=\$\{CONFIG:-(\S+)\}", text, flags=re.M)
    assert (ROOT / config).is_file(), config
    # The Dockerfile copies what the script runs.
    assert "COPY tools ./tools" in dockerfile and "COPY examples ./examples" in dockerfile


def test_the_checkout_shadows_no_kernels_package():
    """From the repository root (first on sys.path under `python -m pytest` or `python -c`), `import
    kernels` finds Hugging Face's package, which transformers 5.25 and later import, and
    transformers' activations load; the project's kernels are `sara_megatron.kernels`."""
    import subprocess
    import sys

    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = ("import kernels, transformers.activations, sara_megatron.kernels as k; "
            "print(getattr(kernels, '__file__', None)); print(k.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_kernels, ours = proc.stdout.split()[-2:]
    assert hf_kernels != "None" and not hf_kernels.startswith(str(ROOT / "kernels")), hf_kernels
    assert ours == str(ROOT / "kernels" / "sara_kernels" / "__init__.py")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_non_editable_install_carries_the_kernels(tmp_path):
    """The wheel holds `sara_megatron.kernels` (and no top-level `kernels`), and imports from it."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True, timeout=600,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("sara_megatron-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sara_megatron/kernels/routing_js.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=600, capture_output=True)
    code = ("import sara_megatron.kernels as k; "
            "from sara_megatron.kernels import sequence_routing_js_reference; print(k.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ,
                                                       "PYTHONPATH": str(target)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(target / "sara_megatron" / "kernels" / "__init__.py")
