"""Small typed messages that cross the engine's layers (scheduler -> stages -> scheduler).

Only these cross process boundaries between the replica and its stage actors, so they stay plain,
picklable dataclasses: ids, token ids, positions and sampling parameters; never tensors of the cache.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), sorted by id
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely
    # An embedding: nothing is sampled; the last stage returns the mean of the prompt's final-normed hidden
    # states, L2-normalised (StepResult.pooled), and the sequence ends with that one step.
    embed: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def adjusts_logits(self) -> bool:
        return self.penalized or bool(self.logit_bias)


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """One sequence's share of a step: `token_ids` enter at positions start_pos.. start_pos+len-1."""

    seq_id: str
    slot: int
    start_pos: int
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    sample: bool = True  # False for a prefill chunk that does not reach the prompt's end
    # A grammar's allowed next tokens (token_mask.py: packed int32 words, bit i of the vocabulary set when
    # token i may follow); None: any token. Computed by the coordinator, applied where the token is sampled.
    token_mask: bytes | None = None
    output_start: int = 0  # the prompt's length: tokens at positions from here on were generated (penalties)


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What a request's output must match: `json_object` (any JSON object) or `json_schema` (`schema`, JSON
    text; strict). Compiled on the replica for its tokenizer (serve_apps.engine.grammar)."""

    kind: str  # "json_object" | "json_schema"
    schema: str | None = None


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One forward pass through every stage: prefill chunks and/or single-token decodes."""

    step_id: int
    chunks: tuple[SeqChunk, ...]
    released_slots: tuple[tuple[str, int], ...] = ()  # (seq_id, slot) pairs finished since the last step

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The model's log-probability of a sampled token and of the `top` most likely tokens at its place
    (raw: log-softmax of the logits, before temperature, penalties and bias, as vLLM reports them)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class StepResult:
    """What the last stage returns: the sampled token per chunk (-1 where the chunk did not sample), and
    per chunk its logprobs where the chunk's sampling asked for them (empty tuple: none asked), and per
    chunk the pooled embedding of an embedding sequence's last chunk (None elsewhere; empty tuple: no chunk
    of the step pooled)."""

    step_id: int
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs | None, ...] = ()
    pooled: tuple[tuple[float, ...] | None, ...] = ()


@dataclass(frozen=True, slots=True)
class StageInfo:
    """A stage actor's self-description: proves which layers it holds and what it costs."""

    stage_index: int
    layer_start: int
    layer_end: int
    has_embedding: bool
    has_lm_head: bool
    param_count: int
    param_bytes: int
    rss_bytes: int
    load_rss_bytes: int  # resident memory the stage's weights added to its process when loaded
    pid: int
    node_id: str
    actor_name: str
    torch_threads: int
    kv_slots: int
    kv_capacity_tokens: int
    extra: dict[str, str] = field(default_factory=dict)
    busy_s: float = 0.0  # seconds this stage spent computing steps since it started
    steps: int = 0  # steps it computed
    cpus: int = 0  # CPUs its process may run on (its node's, unless pinned); 0: unknown
