import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("SYNEHR_PROGRESS", "0")
