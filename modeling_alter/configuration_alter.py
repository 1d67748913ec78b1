"""Configuration of ALTER models: a T5 configuration plus the Mixture-of-Task-Adapters (MTA) fields."""

from transformers import PretrainedConfig

MTA_PLACEMENTS = ("ffn", "self_attention", "cross_attention")


class AlterConfig(PretrainedConfig):
    r"""
    Configuration of an [`AlterForConditionalGeneration`]: every [`T5Config`] hyperparameter with the same name and
    meaning, plus the fields of the Mixture-of-Task-Adapters.

    T5 arguments (see `T5Config`): `vocab_size`, `d_model`, `d_kv`, `d_ff`, `num_layers`, `num_decoder_layers`,
    `num_heads`, `relative_attention_num_buckets`, `relative_attention_max_distance`, `dropout_rate`,
    `layer_norm_epsilon`, `initializer_factor`, `feed_forward_proj` (`"relu"` for T5 v1.0, `"gated-gelu"` for
    T5 v1.1 / Flan-T5), `use_cache`, `pad_token_id`, `eos_token_id`, `decoder_start_token_id`,
    `tie_word_embeddings` (T5 v1.0 ties the LM head to the input embeddings and rescales the decoder output by
    `d_model**-0.5`; Flan-T5 does neither).

    Args:
        task_names (`list[str]`):
            The tasks, one task adapter each. A task's id is its position in this list.
        adapter_dim (`int`, defaults to 64):
            Bottleneck size r of every adapter (`D: d_model -> r`, `U: r -> d_model`).
        adapter_activation (`str`, defaults to `"relu"`):
            Activation between the adapter's down and up projections (any key of `transformers.activations.ACT2FN`).
        adapter_form (`str`, defaults to `"plain"`):
            `"plain"`: `A(u) = U act(D u)`. `"gated"`: `A(u) = U (act(D u) * (L u))`, the form of a gated FFN (T5 v1.1 /
            Flan-T5), so that with `adapter_activation` equal to the FFN's (`"gelu_new"` for `gated-gelu`) a task's
            stage-1 adapter merges exactly into a plain T5 (`alter-hub export-task`). Its extra linear branch `L`
            (`task_linear`, `shared_linear`) starts random like `D`.
        num_shared_adapters (`int`, defaults to 1):
            Number S of adapters shared by all tasks; they are trained in stage 2 only.
        mta_placement (`list[str]`, defaults to `["ffn"]`):
            Sublayers of every block that carry an MTA module, among `"ffn"`, `"self_attention"` and
            `"cross_attention"`. `"ffn"` is required.
        router_top_k (`int`, `"auto"` or `None`, defaults to `"auto"`):
            Stage 2: keep only the k largest gate weights per token (renormalised). `None` routes densely. `"auto"`
            routes densely up to 16 adapters (tasks + shared) and top-2 past that, so that stage-2 cost stops growing
            with the number of tasks (see `mta.resolve_top_k`).
        router_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the load-balancing auxiliary loss added to `loss` in stage 2.
        task_id_drop_rate (`float`, defaults to 0.1):
            Stage 2, training only: probability of replacing an example's task id by the "unknown task" embedding,
            so that the model can route without task ids at inference.
        stage (`int`, defaults to 1):
            1: each example uses its own task adapter ("task selector"). 2: a learned token-level gate mixes all
            task and shared adapters ("collaboration"). Change it with `model.set_stage(n)`.
        stage1_train_backbone (`bool`, defaults to `True`):
            Whether stage 1 trains the backbone together with the task adapters, or the task adapters alone.
        task_prefixes (`dict[str, str]`, *optional*):
            Input prefix of each task (e.g. `{"sentiment": "sst2: "}`): with `task_ids=None`, `forward` and `generate`
            infer each example's task from the token ids its input starts with (see `task_prefix_ids`). An input
            that matches no prefix uses the unknown-task route in stage 2 and raises in stage 1.
        task_prefix_ids (`dict[str, list[int]]`, *optional*):
            The token ids each task's input starts with, filled from `task_prefixes` by
            `model.set_task_prefixes(tokenizer=...)` (matching compares token ids, never decoded text).
        base_model (`str`, *optional*):
            Hub id of the T5 checkpoint the model was converted from; `from_t5` records it (never a local path) for
            the model card.
    """

    model_type = "alter"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    }

    def __init__(
        self,
        task_names=("default",),
        adapter_dim=64,
        adapter_activation="relu",
        adapter_form="plain",
        num_shared_adapters=1,
        mta_placement=("ffn",),
        router_top_k="auto",
        router_aux_loss_coef=0.01,
        task_id_drop_rate=0.1,
        stage=1,
        stage1_train_backbone=True,
        task_prefixes=None,
        task_prefix_ids=None,
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=None,
        num_heads=8,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        initializer_factor=1.0,
        feed_forward_proj="relu",
        is_encoder_decoder=True,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.task_names = _check_task_names(task_names)
        self.adapter_dim = _check_int("adapter_dim", adapter_dim, minimum=1)
        self.adapter_activation = adapter_activation
        if adapter_form not in ("plain", "gated"):
            raise ValueError(f"adapter_form={adapter_form!r} is not valid: expected 'plain' or 'gated'.")
        self.adapter_form = adapter_form
        self.num_shared_adapters = _check_int("num_shared_adapters", num_shared_adapters, minimum=0)
        self.mta_placement = _check_placement(mta_placement)
        self.router_top_k = router_top_k
        self.router_aux_loss_coef = float(router_aux_loss_coef)
        self.task_id_drop_rate = float(task_id_drop_rate)
        self.stage = stage
        self.stage1_train_backbone = bool(stage1_train_backbone)
        self.task_prefixes, self.task_prefix_ids = _check_prefixes(self.task_names, task_prefixes, task_prefix_ids)

        self.vocab_size = vocab_size
        self.d_model = d_model
        self.d_kv = d_kv
        self.d_ff = d_ff
        self.num_layers = num_layers
        self.num_decoder_layers = num_decoder_layers if num_decoder_layers is not None else num_layers
        self.num_heads = num_heads
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.dropout_rate = dropout_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_factor = initializer_factor
        self.feed_forward_proj = feed_forward_proj
        self.use_cache = use_cache

        act_info = feed_forward_proj.split("-")
        if len(act_info) > 2 or (len(act_info) == 2 and act_info[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={feed_forward_proj!r} is not valid: expected 'ACT' or 'gated-ACT', "
                "e.g. 'relu' or 'gated-gelu'."
            )
        self.dense_act_fn = "gelu_new" if feed_forward_proj == "gated-gelu" else act_info[-1]
        self.is_gated_act = act_info[0] == "gated"

        from transformers.activations import ACT2FN

        for name in ("adapter_activation", "dense_act_fn"):
            if getattr(self, name) not in ACT2FN:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a known activation; expected one of {sorted(ACT2FN)}.")
        if router_top_k is not None and router_top_k != "auto":
            n_adapters = len(self.task_names) + self.num_shared_adapters
            if isinstance(router_top_k, bool) or not isinstance(router_top_k, int) or router_top_k < 1:
                raise ValueError(f"router_top_k={router_top_k!r} is not valid: expected None (dense), 'auto' or an "
                                 "integer >= 1.")
            if router_top_k > n_adapters:
                raise ValueError(
                    f"router_top_k={router_top_k} is larger than the number of adapters ({len(self.task_names)} task "
                    f"+ {self.num_shared_adapters} shared = {n_adapters})."
                )
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef={router_aux_loss_coef} must be >= 0.")
        if not 0.0 <= self.task_id_drop_rate < 1.0:
            raise ValueError(f"task_id_drop_rate={task_id_drop_rate} must be in [0, 1).")
        if stage not in (1, 2):
            raise ValueError(f"stage={stage!r} is not valid: expected 1 or 2.")

        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            is_encoder_decoder=is_encoder_decoder,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def num_tasks(self):
        return len(self.task_names)

    @property
    def num_adapters(self):
        """Task adapters plus shared adapters in every MTA module."""
        return len(self.task_names) + self.num_shared_adapters


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid: expected an integer >= {minimum}.")
    return value


def _check_task_names(task_names):
    if isinstance(task_names, str) or not task_names:
        raise ValueError(f"task_names={task_names!r} is not valid: expected a non-empty list of task names.")
    names = list(task_names)
    bad = [name for name in names if not isinstance(name, str) or not name.strip()]
    if bad:
        raise ValueError(f"task_names contains invalid names {bad!r}: expected non-empty strings.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task_names contains duplicates {duplicates}: every task needs a unique name.")
    return names


def _check_prefixes(task_names, prefixes, prefix_ids):
    """Validates `task_prefixes` (task name -> non-empty string) and `task_prefix_ids` (task name -> non-empty list
    of token ids, only for tasks with a prefix); returns plain dicts or None."""
    if not prefixes:
        if prefix_ids:
            raise ValueError("task_prefix_ids is set but task_prefixes is not: set task_prefixes (task name -> input "
                             "prefix) and fill the ids with model.set_task_prefixes(tokenizer=...).")
        return None, None
    if not isinstance(prefixes, dict):
        raise ValueError(f"task_prefixes={prefixes!r} is not valid: expected a dict from task name to input prefix.")
    unknown = [name for name in prefixes if name not in task_names]
    if unknown:
        raise ValueError(f"task_prefixes names unknown task(s) {unknown}; expected names from {list(task_names)}.")
    bad = {name: p for name, p in prefixes.items() if not isinstance(p, str) or not p}
    if bad:
        raise ValueError(f"task_prefixes has invalid prefixes {bad!r}: expected non-empty strings.")
    values = list(prefixes.values())
    duplicates = sorted({p for p in values if values.count(p) > 1})
    if duplicates:
        raise ValueError(f"task_prefixes gives the same prefix {duplicates} to several tasks; each needs its own.")
    if prefix_ids:
        if set(prefix_ids) != set(prefixes):
            raise ValueError(f"task_prefix_ids has tasks {sorted(prefix_ids)} but task_prefixes has "
                             f"{sorted(prefixes)}; expected the same tasks (refill with model.set_task_prefixes).")
        for name, ids in prefix_ids.items():
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"task_prefix_ids[{name!r}]={ids!r} is not valid: expected a non-empty list of "
                                 "token ids.")
        prefix_ids = {name: list(ids) for name, ids in prefix_ids.items()}
    return dict(prefixes), (prefix_ids or None)


def _check_placement(placement):
    if isinstance(placement, str):
        placement = [placement]
    placement = list(placement)
    unknown = [p for p in placement if p not in MTA_PLACEMENTS]
    if unknown:
        raise ValueError(f"mta_placement contains unknown sublayers {unknown}; expected a subset of {list(MTA_PLACEMENTS)}.")
    if "ffn" not in placement:
        raise ValueError(f"mta_placement={placement} must include 'ffn' (every block's feed-forward carries MTA).")
    return [p for p in MTA_PLACEMENTS if p in placement]


__all__ = ["AlterConfig"]
