"""Configuration of ALTER models: a T5 configuration plus the Mixture-of-Task-Adapters (MTA) fields."""

from transformers import PretrainedConfig

from .configuration_mta import check_activation, set_mta_fields

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
        visible_task_adapters (`list[int]`, *optional*):
            Set by `model.add_tasks`: for each task, then the unknown task, how many task adapters (the first ones)
            its stage-2 gate routes over; the tasks added later are blocked for it. A stage-2 batch is computed over
            the adapters its tasks may use, so existing tasks keep their outputs bit for bit after tasks are added.
            `None` (default): every task routes over every adapter.
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
        visible_task_adapters=None,
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
        set_mta_fields(
            self, task_names=task_names, adapter_dim=adapter_dim, adapter_activation=adapter_activation,
            adapter_form=adapter_form, num_shared_adapters=num_shared_adapters, mta_placement=mta_placement,
            allowed_placements=MTA_PLACEMENTS, router_top_k=router_top_k, router_aux_loss_coef=router_aux_loss_coef,
            task_id_drop_rate=task_id_drop_rate, stage=stage, stage1_train_backbone=stage1_train_backbone,
            task_prefixes=task_prefixes, task_prefix_ids=task_prefix_ids, visible_task_adapters=visible_task_adapters,
        )

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

        check_activation("dense_act_fn", self.dense_act_fn)

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


__all__ = ["AlterConfig"]
