"""Names of the files in a model directory, in one place and free of heavy imports (the CLI's
start-up and `ernie download` read them without loading torch or tokenizers)."""

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

TOKENIZER_JSON = "tokenizer.json"
SPM_MODEL = "tokenizer.model"
ADDED_TOKENS = "added_tokens.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPM_COMPANIONS = (ADDED_TOKENS, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG)
# Every file either tokenizer loading route may read (downloads fetch them, quantized copies carry them).
TOKENIZER_FILES = (TOKENIZER_JSON, SPM_MODEL, *SPM_COMPANIONS)
