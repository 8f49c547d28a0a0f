"""selfplay: iterative self-play preference-data generation and alignment (MAP selection, DPO/SimPO with TRL)."""

__version__ = "0.1.0"

import os as _os

# Nothing is downloaded at run time: every model and dataset comes from a local path or an installed package. Set
# here, before any submodule can import transformers or datasets (they read these at import); a user's own
# setting wins.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    _os.environ.setdefault(_var, "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # SimPO lives in trl.experimental.cpo, on purpose
_os.environ.setdefault("HYDRA_FULL_ERROR", "0")
