"""The trainer's configuration: typed dataclasses, loaded from YAML with dotted ``key=value`` overrides.

Keys follow the seed/verl vocabulary (``algorithm.adv_estimator``, ``actor.policy_loss.loss_mode``,
``actor.tau_pos``, ``actor.megatron.expert_model_parallel_size``, ``data.max_response_length``, ``rollout.n``,
``trainer.save_freq``, ...). verl's ``actor_rollout_ref.`` prefix is accepted and dropped, so overrides copied
from a verl command line (``actor_rollout_ref.actor.tau_neg=1.05``) work unchanged.

:func:`load_config` checks everything it can without a process group or a model: unknown keys, wrong types,
out-of-range values, batch arithmetic, and the parallel layout against the world size and the model's
``config.json``. Every problem is one :class:`InputError` line naming the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_sapo.data.config import DataConfig
from megatron_sapo.errors import InputError
from megatron_sapo.loss import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    check_rollout_correction,
)
from megatron_sapo.parallel.layout import ParallelLayout
from megatron_sapo.rewards.config import DynamicSamplingConfig, RewardConfig
from megatron_sapo.rollout.config import RolloutConfig

DTYPES = ("float32", "bfloat16")


@dataclass
class ModelConfig:
    # HF checkpoint folder: config.json, tokenizer and (unless mcore_checkpoint is set) the initial weights.
    path: str = ""
    # A Megatron distributed checkpoint made by tools/convert_hf_to_mcore.py; loads faster than HF safetensors.
    mcore_checkpoint: str | None = None
    dtype: str = "bfloat16"


@dataclass
class MegatronConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    # Colocated rollout: move these to CPU while the rollout engine holds the GPU, and back for training.
    param_offload: bool = False
    grad_offload: bool = False
    optimizer_offload: bool = False
    # Megatron's hybrid CPU optimizer: this fraction of the optimizer step runs on CPU (0.0 offloads nothing).
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 0.0
    recompute_granularity: str | None = None  # null | selective | full
    recompute_num_layers: int | None = None
    moe_token_dispatcher_type: str = "alltoall"
    moe_aux_loss_coeff: float = 0.0
    moe_grouped_gemm: bool = False
    use_transformer_engine: bool | None = None  # null: when importable on CUDA
    seed: int = 1234

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.context_parallel_size,
            self.expert_model_parallel_size,
            self.expert_tensor_parallel_size,
        )


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class PolicyLossConfig:
    loss_mode: str = "sapo"


@dataclass
class RouterReplayConfig:
    # MoE routing replay (verl's names). disabled; R2: the routing of the old-log-prob pass is replayed in the
    # updates; R3: the rollout engine's routing of every token is replayed in the old-log-prob pass and the updates
    # (SGLang needs --enable-return-routed-experts, which the launcher adds).
    mode: str = "disabled"


@dataclass
class ActorConfig:
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    # SAPO's gate temperatures for positive / negative advantages (paper: 1.0 / 1.05).
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    # PPO/GSPO clipping (loss_mode vanilla or gspo); clip_ratio_c is the dual-clip bound. As in verl, a null
    # clip_ratio_low/high falls back to clip_ratio. SAPO does not clip (its soft gate replaces the clip), so the
    # seed's `clip_ratio_low: null` / `clip_ratio_high: null` change nothing for loss_mode=sapo.
    clip_ratio: float = 0.2
    clip_ratio_low: float | None = 0.2
    clip_ratio_high: float | None = 0.2
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "token-mean"
    # Prompts per optimizer step (each with rollout.n responses); data.train_batch_size must be a multiple.
    ppo_mini_batch_size: int = 8
    ppo_epochs: int = 1
    # Micro-batches are length-bucketed to at most this many (padded) tokens per data-parallel rank.
    max_tokens_per_micro_batch: int = 16384  # verl's ppo_max_token_len_per_gpu
    # Tokens per chunk of the vocab-parallel log-prob computation: bounds its fp32 work space (null: no chunks).
    log_prob_chunk_size: int | None = 4096
    # KL penalty to the reference (initial) policy, and entropy bonus.
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    entropy_coeff: float = 0.0
    # Truncated importance sampling against the rollout engine's log-probs (null: off). The same as
    # algorithm.rollout_correction.rollout_is=token with rollout_is_threshold=tis_cap; set one of the two.
    tis_cap: float | None = None
    router_replay: RouterReplayConfig = field(default_factory=RouterReplayConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)

    @property
    def clip_range(self) -> tuple[float, float]:
        """(low, high) clip ratios of the PPO modes, with verl's fallback of a null bound to ``clip_ratio``."""
        low, high = self.clip_ratio_low, self.clip_ratio_high
        return (self.clip_ratio if low is None else low, self.clip_ratio if high is None else high)


@dataclass
class CriticModelConfig:
    # HF checkpoint folder of the critic's initial trunk (null: model.path, or model.mcore_checkpoint when set).
    # It must have the actor's architecture. A *ForTokenClassification export with one label (transformers' and
    # verl's critic format) brings the value head as score.weight; otherwise the head starts from a seeded init.
    path: str | None = None


@dataclass
class CriticPolicyLossConfig:
    # The seed's `critic.policy_loss.loss_mode=sapo`: verl's critic has no policy loss (it trains on the clipped
    # value loss below whatever the actor's mode), so this key only restates the actor's mode. null, or the same
    # mode as actor.policy_loss.loss_mode; it changes nothing.
    loss_mode: str | None = None


@dataclass
class CriticConfig:
    """The value model of algorithm.adv_estimator=gae (verl's ``critic.*``): the policy's trunk with a scalar head, on
    the actor's processes and parallel layout (actor.megatron.*: layout, offload switches, micro-batch tokens).
    Ignored with the other estimators. A null below takes the actor's value, as in verl."""

    model: CriticModelConfig = field(default_factory=CriticModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))  # verl's critic lr
    ppo_epochs: int | None = None
    ppo_mini_batch_size: int | None = None  # prompts per critic optimizer step
    # verl's clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2).
    cliprange_value: float = 0.5
    loss_agg_mode: str | None = None
    policy_loss: CriticPolicyLossConfig = field(default_factory=CriticPolicyLossConfig)


@dataclass
class RolloutCorrectionConfig:
    """verl's ``algorithm.rollout_correction``; formulas in ``megatron_sapo/loss/rollout_correction.py``."""

    rollout_is: str | None = None  # null | token | sequence | icepop (slime's)
    rollout_is_threshold: float = 2.0
    rollout_is_threshold_lower: float | None = None  # icepop's lower bound (null: 1 / rollout_is_threshold)
    rollout_rs: str | None = None  # null | token | sequence | geometric | token_k1 ... seq_max_k3
    rollout_rs_threshold: float | None = None
    rollout_rs_threshold_lower: float | None = None  # ratio options (null: 1 / rollout_rs_threshold)
    # The engine's log-probs serve as the old policy: one forward pass fewer per step; SAPO's ratio is then
    # pi / pi_rollout itself, and rollout_is/rollout_rs (which compare the two) must be null.
    bypass_mode: bool = False


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"
    norm_adv_by_std_in_grpo: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)


@dataclass
class TrainerConfig:
    # Training steps (verl's total_training_steps). null: total_epochs × (prompts in data.train_files //
    # data.train_batch_size), verl's count (its loader drops each epoch's last partial batch); set both and
    # total_steps wins, as in verl.
    total_steps: int | None = None
    total_epochs: int = 30
    # The launch the config was written for (verl's keys): checked against torchrun's world when set (null: any).
    n_gpus_per_node: int | None = None
    nnodes: int | None = None
    save_freq: int = 0  # 0: only at the end
    # With data.val_files: validate every test_freq steps (0: after the last step only) and, with
    # val_before_train, once before the first step (logged as step 0). Sampling: rollout.val_kwargs.
    test_freq: int = 0
    val_before_train: bool = True
    output_dir: str = "outputs/run"
    resume: str = "auto"  # auto | disable | a checkpoint folder
    max_checkpoints_to_keep: int = 2
    seed: int = 1
    export_hf_at_end: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None
    save_timeout_s: float = 3600.0
    # sync: rollout, then training, then weight sync, in turn. one_step_off: step t+1's batch is generated (on the
    # weights after step t-1) while step t trains, so every sample is exactly one update stale after the first step;
    # it needs the rollout servers on devices of their own (no colocated memory saver, tensor sync or offload).
    rollout_mode: str = "sync"
    # algorithm.adv_estimator=gae: verl's critic warm-up. The actor updates (and the rollout engine gets new
    # weights) from step critic_warmup on (steps count from 1, so 0 and 1 both mean from the first step); before
    # that only the critic trains.
    critic_warmup: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)

    @property
    def use_critic(self) -> bool:
        """verl's use_critic: a critic exists exactly when the advantages are GAE's."""
        return self.algorithm.adv_estimator == "gae"


VERL_PREFIX = "actor_rollout_ref."


def _normalise_override(item: str) -> str:
    if "=" not in item:
        raise InputError(f"override {item!r}: write overrides as key=value, e.g. actor.tau_pos=1.0")
    return item[len(VERL_PREFIX) :] if item.startswith(VERL_PREFIX) else item


def _omegaconf_error(error: OmegaConfBaseException) -> InputError:
    key = getattr(error, "full_key", None) or "config"
    message = str(error).splitlines()[0]
    if "not in" in message:
        return InputError(f"{key}: unknown key ({message}); check the spelling against the recipe config.yaml")
    return InputError(f"{key}: {message}")


def load_config(
    path: str | None,
    overrides: list[str] = (),
    *,
    world_size: int | None = None,
    check_paths: bool = True,
    hf_config_dir: str | None = None,
) -> Config:
    """Read, merge and validate the configuration; raise one InputError line for the first problem.

    ``check_paths=False`` skips the checks that the model folder and prompt files exist, and ``hf_config_dir``
    names where the model's config.json is read from instead of ``model.path``: the memory planner uses both to
    plan a run on a machine that has neither the checkpoint nor the data.
    """
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            if not os.path.isfile(path):
                raise InputError(
                    f"--config: {path} does not exist; pass a YAML file such as recipes/tiny_moe/config.yaml"
                )
            loaded = OmegaConf.load(path)
            for key in [k for k in loaded if isinstance(k, str) and k == VERL_PREFIX[:-1]]:
                raise InputError(
                    f"{path}: move the '{key}:' section's contents to the top level (actor, rollout, model)"
                )
            layers.append(loaded)
        layers.append(OmegaConf.from_dotlist([_normalise_override(item) for item in overrides]))
        config: Config = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as error:
        raise _omegaconf_error(error) from None
    except InputError:
        raise
    except Exception as error:  # yaml syntax and the like
        raise InputError(f"{path or 'config'}: {str(error).splitlines()[0]}") from None
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    validate_config(config, world_size, check_paths=check_paths, hf_config_dir=hf_config_dir)
    return config


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def _choice(key: str, value, choices) -> None:
    _check(value in choices, f"{key}={value!r}: use one of {', '.join(map(str, choices))}")


def _colocated_switches(config: Config, world_size: int) -> list[str]:
    """The settings that make the rollout servers share the trainer's devices (set to a non-default value)."""
    megatron, rollout = config.actor.megatron, config.rollout
    found = [f"rollout.{name}=true" for name in ("enable_memory_saver",) if getattr(rollout, name)]
    found += [f"actor.megatron.{name}=true" for name in ("param_offload", "grad_offload", "optimizer_offload")
              if getattr(megatron, name)]  # fmt: skip
    if rollout.weight_sync == "tensor":
        found.append("rollout.weight_sync=tensor")
    elif rollout.backend != "external" and rollout.weight_sync == "auto":
        from megatron_sapo.rollout.weight_sync import launched_ranks_per_server, resolve_weight_sync

        mode = resolve_weight_sync(rollout, trainer_ranks=world_size,
                                   ranks_per_server=launched_ranks_per_server(rollout))  # fmt: skip
        if mode == "tensor":
            found.append("rollout.weight_sync=auto (resolved to tensor: colocated)")
    return found


def validate_config(config: Config, world_size: int, *, check_paths: bool = True, hf_config_dir: str | None = None):
    """The cross-field rules (each field's own range is checked by its dataclass or here)."""
    from megatron_sapo.hub import parse_hub_id, resolve_model_path
    from megatron_sapo.models import load_arch, transformer_engine_usable
    from megatron_sapo.parallel.layout import validate_layout

    actor, megatron, data, trainer = config.actor, config.actor.megatron, config.data, config.trainer
    # Hub ids (org/name[@revision]): their config files now, for the checks below; the weights once all passed.
    hub_models = [(key, model, model.path) for key, model in (("model.path", config.model),
                  ("critic.model.path", config.critic.model)) if parse_hub_id(model.path or "")]  # fmt: skip
    if hf_config_dir is not None and not check_paths:
        hub_models = []  # the planner, with the model's config.json at hand
    for key, model, hub_id in hub_models:
        model.path = resolve_model_path(hub_id, field=key, config_only=True)
    if check_paths:
        _check(
            bool(config.model.path), "model.path is empty: set it to an HF checkpoint folder (config.json, tokenizer)"
        )
        _check(os.path.isdir(config.model.path), f"model.path={config.model.path}: no such folder, and not a Hub id "
               "(org/name[@revision]); point it at an HF checkpoint folder")  # fmt: skip
        _check(bool(data.train_files), "data.train_files is empty: list one or more .jsonl/.parquet prompt files")
        for split in ("train", "val"):
            for file in getattr(data, f"{split}_files"):
                _check(os.path.isfile(file), f"data.{split}_files: {file} does not exist")
    _choice("model.dtype", config.model.dtype, DTYPES)
    _choice("actor.policy_loss.loss_mode", actor.policy_loss.loss_mode, sorted(POLICY_LOSSES))
    _choice("actor.loss_agg_mode", actor.loss_agg_mode, LOSS_AGG_MODES)
    _choice("actor.kl_loss_type", actor.kl_loss_type, sorted(KL_ESTIMATORS))
    _choice("algorithm.adv_estimator", config.algorithm.adv_estimator, ADVANTAGE_ESTIMATORS)
    _check(config.rollout.temperature > 0, f"rollout.temperature={config.rollout.temperature}: must be > 0 for "
           "training; the loss uses log-probs of softmax(logits / temperature)")  # fmt: skip
    if config.rollout.backend != "external":  # external servers' layouts are known once they answer /server_info
        from megatron_sapo.rollout.weight_sync import launched_ranks_per_server, resolve_weight_sync

        resolve_weight_sync(config.rollout, trainer_ranks=world_size,
                            ranks_per_server=launched_ranks_per_server(config.rollout))  # fmt: skip
    _check(actor.tau_pos > 0, f"actor.tau_pos={actor.tau_pos}: must be > 0 (paper: 1.0)")
    _check(actor.tau_neg > 0, f"actor.tau_neg={actor.tau_neg}: must be > 0 (paper: 1.05)")
    _check(actor.clip_ratio >= 0, f"actor.clip_ratio={actor.clip_ratio}: must be >= 0")
    _check(min(actor.clip_range) >= 0, "actor.clip_ratio_low/high: must be >= 0, or null (then actor.clip_ratio)")
    _check(actor.clip_ratio_c > 1, f"actor.clip_ratio_c={actor.clip_ratio_c}: must be > 1")
    _check(actor.tis_cap is None or actor.tis_cap > 0, f"actor.tis_cap={actor.tis_cap}: must be > 0, or null")
    _validate_mismatch_control(config)
    _check(actor.ppo_mini_batch_size >= 1, f"actor.ppo_mini_batch_size={actor.ppo_mini_batch_size}: must be >= 1")
    _check(
        data.train_batch_size % actor.ppo_mini_batch_size == 0,
        f"data.train_batch_size={data.train_batch_size} is not a multiple of actor.ppo_mini_batch_size="
        f"{actor.ppo_mini_batch_size}; make the batch divisible into mini-batches",
    )
    _check(actor.ppo_epochs >= 1, f"actor.ppo_epochs={actor.ppo_epochs}: must be >= 1")
    longest = data.max_prompt_length + data.max_response_length
    _check(
        actor.max_tokens_per_micro_batch >= longest,
        f"actor.max_tokens_per_micro_batch={actor.max_tokens_per_micro_batch} is below data.max_prompt_length + "
        f"data.max_response_length = {longest}; raise it so that the longest sample fits a micro-batch",
    )
    optim = actor.optim
    _check(optim.lr > 0, f"actor.optim.lr={optim.lr}: must be > 0")
    _choice("actor.optim.lr_decay_style", optim.lr_decay_style, ("constant", "linear", "cosine"))
    _check(optim.clip_grad >= 0, f"actor.optim.clip_grad={optim.clip_grad}: must be >= 0 (0 disables clipping)")
    _choice("actor.megatron.recompute_granularity", megatron.recompute_granularity, (None, "selective", "full"))
    _choice("actor.megatron.moe_token_dispatcher_type", megatron.moe_token_dispatcher_type, ("alltoall", "allgather"))
    fraction = megatron.optimizer_offload_fraction
    _check(0.0 <= fraction <= 1.0, f"actor.megatron.optimizer_offload_fraction={fraction}: must be in [0, 1]")
    _check(trainer.total_steps is None or trainer.total_steps >= 1,
           f"trainer.total_steps={trainer.total_steps}: must be >= 1, or null (then trainer.total_epochs)")  # fmt: skip
    _check(trainer.total_epochs >= 1, f"trainer.total_epochs={trainer.total_epochs}: must be >= 1")
    _check_launch(trainer, world_size)
    _choice("trainer.rollout_mode", trainer.rollout_mode, ("sync", "one_step_off"))
    colocated = _colocated_switches(config, world_size)
    _check(trainer.rollout_mode == "sync" or not colocated,
           f"trainer.rollout_mode=one_step_off: {colocated[0] if colocated else ''} shares the trainer's devices with "
           "the rollout servers, so generation cannot overlap training; give the servers their own GPUs/nodes (and "
           "turn it off) or use trainer.rollout_mode=sync")  # fmt: skip
    _check(trainer.test_freq >= 0, f"trainer.test_freq={trainer.test_freq}: must be >= 0 (0: after the last step)")
    _check(trainer.save_freq >= 0, f"trainer.save_freq={trainer.save_freq}: must be >= 0 (0: only at the end)")
    _check(trainer.max_checkpoints_to_keep >= 1, "trainer.max_checkpoints_to_keep: must be >= 1")
    _check(
        trainer.resume in ("auto", "disable") or os.path.isdir(trainer.resume),
        f"trainer.resume={trainer.resume!r}: use auto, disable, or an existing checkpoint folder",
    )

    arch = load_arch(hf_config_dir or config.model.path)
    replay = actor.router_replay.mode
    _check(replay == "disabled" or any(arch.moe_layer_pattern),
           f"actor.router_replay.mode={replay}: the model has no MoE layers to replay; set it to disabled")  # fmt: skip
    _check(replay == "disabled" or megatron.context_parallel_size == 1,
           f"actor.router_replay.mode={replay}: not supported with actor.megatron.context_parallel_size="
           f"{megatron.context_parallel_size} (context parallelism reorders tokens); use 1")  # fmt: skip
    te = megatron.use_transformer_engine if megatron.use_transformer_engine is not None else transformer_engine_usable()
    validate_layout(megatron.layout, world_size, arch, prefix="actor.megatron.", te=te)
    dp = megatron.layout.data_parallel_size(world_size)
    samples = actor.ppo_mini_batch_size * config.rollout.n
    _check(
        samples % dp == 0,
        f"actor.ppo_mini_batch_size × rollout.n = {samples} samples per mini-batch do not split over {dp} "
        "data-parallel ranks; make it a multiple of the data-parallel size",
    )
    _check(
        longest <= arch.max_position_embeddings,
        f"data.max_prompt_length + data.max_response_length = {longest} exceeds the model's "
        f"max_position_embeddings={arch.max_position_embeddings}",
    )
    _check(trainer.critic_warmup >= 0, f"trainer.critic_warmup={trainer.critic_warmup}: must be >= 0 (0: no warm-up)")
    for key in ("gamma", "lam"):
        value = getattr(config.algorithm, key)
        _check(0 <= value <= 1, f"algorithm.{key}={value}: must be in [0, 1]")
    if config.use_critic:
        _validate_critic(config, dp, arch, check_paths=check_paths)
    for key, model, hub_id in hub_models if check_paths else ():
        model.path = resolve_model_path(hub_id, field=key)


# The critic.* settings that take the actor's value when null (verl interpolates them from the actor's).
CRITIC_FROM_ACTOR = ("ppo_epochs", "ppo_mini_batch_size", "loss_agg_mode")


def _validate_critic(config: Config, dp: int, arch, *, check_paths: bool) -> None:
    """critic.* for algorithm.adv_estimator=gae; its nulls take the actor's values here (the saved config shows
    what ran)."""
    critic, data = config.critic, config.data
    for name in CRITIC_FROM_ACTOR:
        if getattr(critic, name) is None:
            setattr(critic, name, getattr(config.actor, name))
    _check(critic.ppo_epochs >= 1, f"critic.ppo_epochs={critic.ppo_epochs}: must be >= 1")
    _check(critic.ppo_mini_batch_size >= 1, f"critic.ppo_mini_batch_size={critic.ppo_mini_batch_size}: must be >= 1")
    _check(data.train_batch_size % critic.ppo_mini_batch_size == 0,
           f"data.train_batch_size={data.train_batch_size} is not a multiple of critic.ppo_mini_batch_size="
           f"{critic.ppo_mini_batch_size}; make the batch divisible into mini-batches")  # fmt: skip
    samples = critic.ppo_mini_batch_size * config.rollout.n
    _check(samples % dp == 0, f"critic.ppo_mini_batch_size × rollout.n = {samples} samples per mini-batch do not "
           f"split over {dp} data-parallel ranks; make it a multiple of the data-parallel size")  # fmt: skip
    _choice("critic.loss_agg_mode", critic.loss_agg_mode, LOSS_AGG_MODES)
    _check(critic.cliprange_value > 0, f"critic.cliprange_value={critic.cliprange_value}: must be > 0 (verl: 0.5)")
    optim = critic.optim
    _check(optim.lr > 0, f"critic.optim.lr={optim.lr}: must be > 0")
    _choice("critic.optim.lr_decay_style", optim.lr_decay_style, ("constant", "linear", "cosine"))
    _check(optim.clip_grad >= 0, f"critic.optim.clip_grad={optim.clip_grad}: must be >= 0 (0 disables clipping)")
    mode, actor_mode = critic.policy_loss.loss_mode, config.actor.policy_loss.loss_mode
    _check(mode in (None, actor_mode),
           f"critic.policy_loss.loss_mode={mode}: the critic has no policy loss (it trains on the clipped value "
           f"loss, critic.cliprange_value); the key may only restate actor.policy_loss.loss_mode={actor_mode}, or be "
           "null")  # fmt: skip
    path = critic.model.path
    if path is not None and check_paths:
        _check(os.path.isfile(os.path.join(path, "config.json")),
               f"critic.model.path={path}: no config.json there; point it at an HF checkpoint folder")  # fmt: skip
        with open(os.path.join(path, "config.json")) as f:
            own = json.load(f)
        for key, value in (("hidden_size", arch.hidden_size), ("num_hidden_layers", arch.num_layers),
                           ("vocab_size", arch.vocab_size)):  # fmt: skip
            _check(own.get(key) == value, f"critic.model.path={path}: its config.json has {key}={own.get(key)}, the "
                   f"actor's model {value}; the critic shares the actor's architecture")  # fmt: skip


def _check_launch(trainer: TrainerConfig, world_size: int) -> None:
    """verl's trainer.n_gpus_per_node / trainer.nnodes against the processes torchrun started (LOCAL_WORLD_SIZE per
    node, GROUP_WORLD_SIZE nodes, WORLD_SIZE in all); a key left null takes torchrun's value."""
    per_node, nodes = trainer.n_gpus_per_node, trainer.nnodes
    if per_node is None and nodes is None:
        return
    for key, value in (("n_gpus_per_node", per_node), ("nnodes", nodes)):
        _check(value is None or value >= 1, f"trainer.{key}={value}: must be >= 1, or null (torchrun's)")
    local = os.environ.get("LOCAL_WORLD_SIZE")
    per_node = per_node or (int(local) if local else world_size // (nodes or 1))
    nodes = nodes or int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    launched = f"torchrun started {world_size} process{'es' if world_size > 1 else ''}" + (
        f" ({local} per node)" if local else "")  # fmt: skip
    _check(
        per_node * nodes == world_size and (not local or int(local) == per_node),
        f"trainer.n_gpus_per_node={per_node} × trainer.nnodes={nodes} = {per_node * nodes} processes, but {launched}; "
        f"launch torchrun --nnodes={nodes} --nproc_per_node={per_node}, or set both keys to match (null: torchrun's)",
    )


def resolve_total_steps(trainer: TrainerConfig, data: DataConfig, num_prompts: int) -> int:
    """trainer.total_steps, or verl's count from trainer.total_epochs: whole batches of data.train_batch_size
    prompts per epoch (a partial last batch is not counted)."""
    if trainer.total_steps is not None:
        return trainer.total_steps
    per_epoch = num_prompts // data.train_batch_size
    _check(per_epoch >= 1, f"trainer.total_epochs={trainer.total_epochs}: data.train_files hold {num_prompts} prompts, "
           f"fewer than one batch (data.train_batch_size={data.train_batch_size}); lower the batch or set "
           "trainer.total_steps")  # fmt: skip
    return per_epoch * trainer.total_epochs


ROUTER_REPLAY_MODES = ("disabled", "R2", "R3")


def _validate_mismatch_control(config: Config) -> None:
    """algorithm.rollout_correction.* and actor.router_replay.mode (the model-dependent part is in validate_config)."""
    rc = config.algorithm.rollout_correction
    check_rollout_correction(rc.rollout_is, rc.rollout_is_threshold, rc.rollout_is_threshold_lower, rc.rollout_rs,
                             rc.rollout_rs_threshold, rc.rollout_rs_threshold_lower)  # fmt: skip
    _check(
        config.actor.tis_cap is None or rc.rollout_is is None,
        f"actor.tis_cap={config.actor.tis_cap} and algorithm.rollout_correction.rollout_is={rc.rollout_is} both "
        "weight tokens by the engine's log-probs; keep one (tis_cap=c is rollout_is=token, rollout_is_threshold=c)",
    )
    _check(
        not (rc.bypass_mode and config.actor.router_replay.mode == "R2"),
        "actor.router_replay.mode=R2 replays the routing of the old-log-prob pass, which "
        "algorithm.rollout_correction.bypass_mode=true skips; use R3 (the engine's routing) or turn bypass off",
    )
    _check(
        not (rc.bypass_mode and (rc.rollout_is or rc.rollout_rs)),
        "algorithm.rollout_correction.bypass_mode=true makes the engine's log-probs the old policy, so SAPO's ratio "
        "is already pi / pi_rollout and rollout_is/rollout_rs have no trainer log-probs to compare; set them to null",
    )
    _choice("actor.router_replay.mode", config.actor.router_replay.mode, ROUTER_REPLAY_MODES)


def save_resolved_config(config: Config, output_dir: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "config.yaml")
    saved = OmegaConf.structured(config)
    if saved.rollout.api_key:
        saved.rollout.api_key = None  # a secret: a rerun takes it from $MEGATRON_SAPO_ROLLOUT_API_KEY or the CLI
    with open(path + ".tmp", "w") as f:
        f.write(OmegaConf.to_yaml(saved))
    os.replace(path + ".tmp", path)
    return path
