"""lic-lab: train, entropy-code and evaluate learned image codecs."""

import warnings

# CompressAI 1.2.8 scripts two helpers with torch.jit at import time, which torch >= 2.10 marks
# deprecated on every run; the warning is about CompressAI's code, not the user's.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)
