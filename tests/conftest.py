import os

# Tests never download: loaders must use files the tests write, or fail with one clear line.
os.environ["FA_RULES_OFFLINE"] = "1"
os.environ.setdefault("FA_RULES_DATA_DIR", os.path.join(os.path.dirname(__file__), ".data-unused"))
