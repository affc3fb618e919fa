"""Schemas of the `train` group (with its optimizer, checkpoint and parallelism sub-groups), `scaling` and `plan`."""

from dataclasses import dataclass, field

from llm_platform.config.choices import (
    MixedPrecision,
    Objective,
    OnNonfinite,
    Parallelism,
    Placement,
    PreferenceLoss,
    Schedule,
)
from llm_platform.config.prices import PricesConfig


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (train/optim.py)."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    schedule: Schedule = Schedule.cosine
    """Decay after warmup: cosine, linear or constant."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases, norms and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables)."""


@dataclass
class CheckpointConfig:
    """Sharded checkpoints of a run (train/checkpoint.py), and the one a new run starts from."""

    interval_steps: int = 100
    """Sharded checkpoint every N steps (and at the end)."""
    keep_latest: int = 2
    """Checkpoints kept (the newest)."""
    resume_from: str | None = None
    """Checkpoint URI (`runs/<run>/checkpoint_<step>`) that seeds a new run: its weights, optimizer, step, data."""


@dataclass
class ParallelismConfig:
    """How the model is spread over the workers and computed (train/parallelize.py)."""

    strategy: Parallelism = Parallelism.fsdp
    """fsdp (FSDP2 fully_shard per block), ddp, or none (single worker)."""
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass."""
    cpu_offload: bool = False
    """FSDP2 CPU offload of parameters and gradients."""
    compile: bool = False
    """torch.compile each block."""


@dataclass
class PreferenceConfig:
    """Preference tuning with `train.objective=dpo` (train/preference.py): the policy against a frozen reference
    (the starting weights; with LoRA, the base with its adapters off)."""

    beta: float = 0.1
    """Strength of the pull towards the reference (DPO's beta; IPO's tau)."""
    loss: PreferenceLoss = PreferenceLoss.sigmoid
    """sigmoid (DPO) or ipo (its squared, length-normalized variant)."""
    label_smoothing: float = 0.0
    """sigmoid only: the assumed chance that a pair's preference is flipped (conservative DPO); 0 is plain DPO."""


@dataclass
class BudgetConfig:
    """What a run may spend (train/budget.py). Reaching either limit stops the run at a checkpoint with a message;
    running it again with the limit raised resumes from that checkpoint. Costs use `plan.prices`."""

    max_cost_usd: float | None = None
    """Stop when the run's accumulated cost (placement $/hour x wall-clock hours, resumed runs included) reaches
    this many dollars; None: no limit."""
    max_gpu_hours: float | None = None
    """Stop when GPUs x wall-clock hours reaches this; None: no limit (CPU workers hold no GPU-hours)."""


@dataclass
class TrainConfig:
    """The training loop: objective, batches, evaluation, outputs; optimizer, checkpoints and parallelism in their
    own groups."""

    objective: Objective = Objective.clm
    """clm (causal LM), sft (prompt/response, loss on the response), seq2seq, mlm, dpo (preference pairs against
    a frozen reference: `train.preference`)."""
    run_name: str | None = None
    """Run folder `runs/<run_name>/`; None derives it from the model and dataset. Reusing a name resumes it."""
    dataset: str | None = None
    """Dataset URI (a data stage output folder); None resolves it from the data and tokenizer configs."""
    max_steps: int = 200
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per worker per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seed of weights init, data order and dropout."""
    shuffle_buffer_rows: int = 1024
    """Shuffling (seeded by seed and epoch): blocks of rows are shuffled each epoch and rows within windows of about
    this many rows (over all data partitions); 0 keeps the shard order."""
    data_partitions: int | None = None
    """Data partitions P of the epoch order (train/reader.py): each worker reads only its partitions when P is a
    multiple of micro_batch_size x num_workers. None: that product at the run's start; checkpoints keep P, so a
    resumed run follows the same order whatever its worker count."""
    mlm_probability: float = 0.15
    """Masked token fraction for the mlm objective."""
    eval_interval_steps: int = 50
    """Validation pass every N steps (and at the end)."""
    eval_batches: int = 10
    """Micro-batches per validation pass."""
    log_interval_steps: int = 10
    """Metrics to console, metrics.jsonl and TensorBoard every N steps."""
    on_nonfinite_loss: OnNonfinite = OnNonfinite.stop
    """A NaN/inf loss: stop the run with a message, or skip the step."""
    max_failures: int = 2
    """Worker failures survived by restarting from the latest checkpoint."""
    export: bool = True
    """Export the final model as HF safetensors with its tokenizer and lineage."""
    register_as: str | None = None
    """Register the exported model under this registry name."""
    mlflow_tracking_uri: str | None = None
    """Also log params and metrics to MLflow at this tracking URI (rank 0; needs the mlflow package)."""
    mlflow_experiment: str = "llm-platform"
    """MLflow experiment of the runs."""
    wandb_project: str | None = None
    """Also log config and metrics to this Weights & Biases project (rank 0; needs wandb; WANDB_* env applies)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and the LR schedule: `train.optimizer.lr`, `.warmup_steps`, ..."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints: `train.checkpoint.interval_steps`, `.keep_latest`, `.resume_from`."""
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    """Parallelism and precision: `train.parallelism.strategy`, `.mixed_precision`, `.compile`, ..."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """Spending limits: `train.budget.max_cost_usd`, `.max_gpu_hours`."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """DPO: `train.preference.beta`, `.loss`, `.label_smoothing`."""


@dataclass
class ScalingConfig:
    """Ray Train workers and their resources."""

    num_workers: int = 2
    """Training workers (one per GPU on GPU clusters)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    gpu_type: str | None = None
    """Accelerator type (H100, A100...) for placement and MFU peaks."""
    placement_strategy: Placement = Placement.PACK
    """Placement group strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD."""
    check_resources: bool = True
    """Refuse a run whose workers the cluster cannot place now (turn off on an autoscaling cluster)."""


@dataclass
class PlanConfig:
    """`llm-platform plan` (and the pre-launch memory check of `train`): size, memory, time and cost."""

    gpu_type: str = "H100"
    """GPU to plan for (a key of the peaks table in llm_platform/models/flops.py: H100, H200, A100)."""
    num_gpus: int | None = None
    """GPUs to plan for; None uses scaling.num_workers."""
    token_budget: int | None = None
    """Training tokens for the time and cost estimate; None: the configured run's (train.max_steps x tokens per
    step, or with plan.sweep the sweep's trials x that)."""
    sweep: bool = False
    """Plan the `tune` sweep (tune.num_samples x grid trials, each up to train.max_steps) instead of one run."""
    assumed_mfu: float = 0.4
    """Model FLOPs utilization assumed for the time estimate."""
    prices: PricesConfig = field(default_factory=PricesConfig)
    """$/hour per GPU and per instance type, on-demand and spot, dated: `plan.prices.gpus.H100.spot_usd_per_hour`,
    ... (llm_platform/config/prices.py)."""
    memory_headroom: float = 0.9
    """Fraction of device memory a plan may use before it is refused."""
    force: bool = False
    """Launch even when the plan says the config does not fit (train), or exit 0 anyway (plan)."""
    serve_context: int = 0
    """Serving lines: the context (prompt + generated tokens) each sequence may reach; 0: the model's maximum."""
    serve_batch: int = 32
    """Serving lines: sequences a replica holds at once (`serve.engine.max_batch_size`)."""
