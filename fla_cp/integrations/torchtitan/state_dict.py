"""(placeholder, being written) HF checkpoint adapters."""
from torchtitan.models.qwen3_5.state_dict_adapter import Qwen35StateDictAdapter


class Qwen35TextStateDictAdapter(Qwen35StateDictAdapter):
    pass
