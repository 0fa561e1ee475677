import os

# hivemind reads its log level at import time; keep test output readable.
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
