from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos", "max_tokens", "presence_penalty", "frequency_penalty", "bias_token_ids", "bias_values", "logprobs", "embed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    BIAS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BIAS_VALUES_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    max_tokens: int
    presence_penalty: float
    frequency_penalty: float
    bias_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bias_values: _containers.RepeatedScalarFieldContainer[float]
    logprobs: int
    embed: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., bias_token_ids: _Optional[_Iterable[int]] = ..., bias_values: _Optional[_Iterable[float]] = ..., logprobs: _Optional[int] = ..., embed: _Optional[bool] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("seq_id", "slot", "start_pos", "token_ids", "sample", "sampling", "token_mask", "output_start")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TOKEN_MASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_START_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    slot: int
    start_pos: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    sampling: Sampling
    token_mask: bytes
    output_start: int
    def __init__(self, seq_id: _Optional[str] = ..., slot: _Optional[int] = ..., start_pos: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., token_mask: _Optional[bytes] = ..., output_start: _Optional[int] = ...) -> None: ...

class Released(_message.Message):
    __slots__ = ("seq_id", "slot")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    slot: int
    def __init__(self, seq_id: _Optional[str] = ..., slot: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("schema_version", "step_id", "chunks", "released", "hidden")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    step_id: int
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    released: _containers.RepeatedCompositeFieldContainer[Released]
    hidden: Tensor
    def __init__(self, schema_version: _Optional[int] = ..., step_id: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., released: _Optional[_Iterable[_Union[Released, _Mapping]]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Logprobs(_message.Message):
    __slots__ = ("present", "logprob", "top_ids", "top_logprobs")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    present: bool
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, present: _Optional[bool] = ..., logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("token_ids", "logprobs", "pooled", "pooled_index")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    POOLED_INDEX_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[Logprobs]
    pooled: Tensor
    pooled_index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[Logprobs, _Mapping]]] = ..., pooled: _Optional[_Union[Tensor, _Mapping]] = ..., pooled_index: _Optional[_Iterable[int]] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("schema_version", "step_id", "hidden", "tokens", "error")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    step_id: int
    hidden: Tensor
    tokens: Tokens
    error: str
    def __init__(self, schema_version: _Optional[int] = ..., step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class LinkFrame(_message.Message):
    __slots__ = ("request", "reply")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    request: StepRequest
    reply: StepReply
    def __init__(self, request: _Optional[_Union[StepRequest, _Mapping]] = ..., reply: _Optional[_Union[StepReply, _Mapping]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("schema_version", "model", "layer_start", "layer_end", "num_layers", "dtype", "kv_slots", "max_len", "weight_quant", "low_bit_max_tokens", "torch_threads", "expected_digest", "max_step_tokens", "max_chunks", "stage_index", "replaces")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_QUANT_FIELD_NUMBER: _ClassVar[int]
    LOW_BIT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    model: str
    layer_start: int
    layer_end: int
    num_layers: int
    dtype: str
    kv_slots: int
    max_len: int
    weight_quant: str
    low_bit_max_tokens: int
    torch_threads: int
    expected_digest: str
    max_step_tokens: int
    max_chunks: int
    stage_index: int
    replaces: str
    def __init__(self, schema_version: _Optional[int] = ..., model: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., dtype: _Optional[str] = ..., kv_slots: _Optional[int] = ..., max_len: _Optional[int] = ..., weight_quant: _Optional[str] = ..., low_bit_max_tokens: _Optional[int] = ..., torch_threads: _Optional[int] = ..., expected_digest: _Optional[str] = ..., max_step_tokens: _Optional[int] = ..., max_chunks: _Optional[int] = ..., stage_index: _Optional[int] = ..., replaces: _Optional[str] = ...) -> None: ...

class StageDescription(_message.Message):
    __slots__ = ("schema_version", "stage_index", "layer_start", "layer_end", "has_embedding", "has_lm_head", "param_count", "param_bytes", "rss_bytes", "load_rss_bytes", "pid", "node_id", "actor_name", "torch_threads", "kv_slots", "kv_capacity_tokens", "extra", "busy_s", "steps", "cpus", "weights_digest", "stage_id")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    HAS_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HAS_LM_HEAD_FIELD_NUMBER: _ClassVar[int]
    PARAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_NAME_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    stage_index: int
    layer_start: int
    layer_end: int
    has_embedding: bool
    has_lm_head: bool
    param_count: int
    param_bytes: int
    rss_bytes: int
    load_rss_bytes: int
    pid: int
    node_id: str
    actor_name: str
    torch_threads: int
    kv_slots: int
    kv_capacity_tokens: int
    extra: _containers.ScalarMap[str, str]
    busy_s: float
    steps: int
    cpus: int
    weights_digest: str
    stage_id: str
    def __init__(self, schema_version: _Optional[int] = ..., stage_index: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., has_embedding: _Optional[bool] = ..., has_lm_head: _Optional[bool] = ..., param_count: _Optional[int] = ..., param_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., load_rss_bytes: _Optional[int] = ..., pid: _Optional[int] = ..., node_id: _Optional[str] = ..., actor_name: _Optional[str] = ..., torch_threads: _Optional[int] = ..., kv_slots: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., extra: _Optional[_Mapping[str, str]] = ..., busy_s: _Optional[float] = ..., steps: _Optional[int] = ..., cpus: _Optional[int] = ..., weights_digest: _Optional[str] = ..., stage_id: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("schema_version", "stage_id")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    stage_id: str
    def __init__(self, schema_version: _Optional[int] = ..., stage_id: _Optional[str] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("schema_version",)
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    def __init__(self, schema_version: _Optional[int] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("schema_version",)
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    def __init__(self, schema_version: _Optional[int] = ...) -> None: ...
