"""llama.cpp as a peer: build `llama-server` from source and convert a checkpoint to GGUF.

No llama.cpp code lives in this repository. The sources come from the `llama-cpp-python`
sdist on PyPI (it vendors llama.cpp), fetched with pip; the build and the converted models
are cached under ~/.cache/punctual/llama.cpp (or $PUNCTUAL_CACHE/llama.cpp).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from punctual.checkpoints.builtin import cache_root

# The converter runs in a child process; this bootstrap puts the sources' gguf-py first on
# sys.path, lets BPE checkpoints convert without sentencepiece, and teaches the converter our tokenizers'
# pre-tokenizer (see convert_to_gguf).
_CONVERT_BOOTSTRAP = r"""
import sys
src, pre = sys.argv[1], sys.argv[2]
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[3:]
sys.path[:0] = [src + "/gguf-py", src]
import convert_hf_to_gguf as conv

def tolerant(original):
    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # an unknown pre-tokenizer hash
            return pre
    return get_vocab_base_pre

def needs_tokenizer_model(original):
    # The Llama converter imports sentencepiece before it looks for tokenizer.model and falls
    # back to tokenizer.json only on FileNotFoundError: look first, so BPE needs no sentencepiece.
    def _create_vocab_sentencepiece(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(self.dir_model / "tokenizer.model")
        return original(self)
    return _create_vocab_sentencepiece

# The method moved from convert_hf_to_gguf into conversion/ in newer sources: patch wherever it is.
for name, module in list(sys.modules.items()):
    if name.startswith(("convert_hf_to_gguf", "conversion")):
        for cls in list(vars(module).values()):
            if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
                cls.get_vocab_base_pre = tolerant(vars(cls)["get_vocab_base_pre"])
            if isinstance(cls, type) and "_create_vocab_sentencepiece" in vars(cls):
                cls._create_vocab_sentencepiece = needs_tokenizer_model(vars(cls)["_create_vocab_sentencepiece"])
sys.exit(conv.main())
"""


def llama_cpp_dir() -> Path:
    return cache_root() / "llama.cpp"


def server_binary() -> Path | None:
    """The built `llama-server`, or None when it has not been built."""
    found = sorted(llama_cpp_dir().glob("build/bin/llama-server"))
    return found[0] if found and os.access(found[0], os.X_OK) else None


def _download_sdist(root: Path) -> Path:
    """The newest llama-cpp-python sdist from PyPI's JSON API, checked against its SHA-256. (Not
    `pip download --no-binary :all:`: that builds the sdist's build dependencies from source too,
    cmake among them, to read its metadata: tens of minutes on 2 cores.)"""
    import json
    import urllib.parse
    import urllib.request

    index = "https://pypi.org/pypi/llama-cpp-python/json"
    with urllib.request.urlopen(index, timeout=60) as response:
        release = json.load(response)
    sdist = next(f for f in release["urls"] if f["packagetype"] == "sdist")
    target = root / sdist["filename"]
    if not target.exists():
        scratch = target.with_suffix(".part")
        url = urllib.parse.urljoin(index, sdist["url"])  # a mirror of PyPI may answer with a relative URL
        with urllib.request.urlopen(url, timeout=600) as response, open(scratch, "wb") as out:
            shutil.copyfileobj(response, out)
        digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
        if digest != sdist["digests"]["sha256"]:
            scratch.unlink()
            raise RuntimeError(f"{sdist['filename']}: SHA-256 {digest} is not PyPI's {sdist['digests']['sha256']}")
        scratch.rename(target)
    return target


def source_dir(download: bool = True) -> Path:
    """The llama.cpp sources, fetched with pip from the llama-cpp-python sdist when absent."""
    root = llama_cpp_dir() / "src"
    found = sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[-1].parent
    if not download:
        raise FileNotFoundError(f"no llama.cpp sources under {root}; run `punctual bench build-llama-cpp`")
    root.mkdir(parents=True, exist_ok=True)
    sdist = _download_sdist(root)
    with tarfile.open(sdist) as archive:
        archive.extractall(root, filter="data")
    return source_dir(download=False)


def build_llama_server(jobs: int = 1, nice: int = 10) -> Path:
    """Configure and build `llama-server` (CPU, native ISA, no network features, no web UI)."""
    src = source_dir()
    build = llama_cpp_dir() / "build"
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # the UI would be downloaded
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True)
    subprocess.run(["nice", "-n", str(nice), "cmake", "--build", str(build), "--target", "llama-server",
                    "llama-quantize", "-j", str(jobs)], check=True)
    binary = server_binary()
    if binary is None:
        raise FileNotFoundError(f"the build finished but no llama-server under {build}")
    return binary


def gguf_path(checkpoint: Path, outtype: str) -> Path:
    resolved = Path(checkpoint).resolve()
    key = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]  # two checkpoints may share a name
    return llama_cpp_dir() / "models" / f"{resolved.name}-{key}-{outtype}.gguf"


def convert_to_gguf(checkpoint: Path, outtype: str = "bf16", pre_tokenizer: str = "gpt-2") -> Path:
    """Convert a Hugging Face checkpoint to GGUF in `outtype` (f32, bf16, f16), cached by path.

    The converter recognises BPE pre-tokenizers by hashing how they split a probe text and
    refuses unknown ones; our built-in tokenizers are unknown to it, so the child process
    wraps `get_vocab_base_pre` to answer `pre_tokenizer` instead of raising. The sources on
    disk are not modified.
    """
    out = gguf_path(checkpoint, outtype)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    command = [sys.executable, "-c", _CONVERT_BOOTSTRAP, str(source_dir()), pre_tokenizer,
               str(checkpoint), "--outfile", str(partial), "--outtype", outtype]
    subprocess.run(command, check=True)
    partial.rename(out)
    return out


def quantize_gguf(source: Path, qtype: str) -> Path:
    """`source` (a bf16/f32 GGUF) quantized by llama.cpp's own `llama-quantize` to `qtype`
    (q4_0, q4_1, q4_k_m, ...), cached beside it."""
    binary = llama_cpp_dir() / "build" / "bin" / "llama-quantize"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"no {binary}; run `punctual bench build-llama-cpp` (it builds llama-quantize too)")
    out = source.with_name(source.name.replace("-bf16.gguf", "").removesuffix(".gguf") + f"-{qtype}.gguf")
    if out.exists():
        return out
    partial = out.with_suffix(".partial")
    subprocess.run([str(binary), str(source), str(partial), qtype.upper()], check=True, capture_output=True)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="build llama.cpp's llama-server into the punctual cache")
    parser.add_argument("-j", "--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    print(build_llama_server(jobs=args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
