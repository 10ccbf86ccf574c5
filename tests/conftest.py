"""Test-wide settings: never reach a model hub, never phone home."""
import os

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}.items():
    os.environ[_name] = _value

import torch  # noqa: E402

# The models under test are tiny: one thread avoids thread-pool overhead dominating on a 2-core machine.
torch.set_num_threads(1)
