"""Stand-ins for what SGLang's model runner hands an attention backend
(shared by the backend tests that build SGLang's real pools themselves)."""

from types import SimpleNamespace


class FakeModelConfig:
    """The fields of SGLang's ModelConfig the backend reads."""

    def __init__(self, n_heads, n_kv_heads, head_dim, context_len, rope_theta=10000.0):
        self.context_len = context_len
        self.head_dim = head_dim
        self.hf_config = SimpleNamespace(rope_theta=rope_theta)
        self._h, self._hk = n_heads, n_kv_heads

    def get_num_attention_heads(self, tp):
        return self._h // tp

    def get_num_kv_heads(self, tp, dcp_size=1):
        return self._hk // tp
