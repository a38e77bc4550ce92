"""Test setup: keep Hugging Face caches in a temp dir, quiet transformers, no network, import from src/."""
import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="prunetune-hf-")
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "src"))  # works without `pip install -e .`
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from helpers import make_tokenizer`
