"""Settings of a training, search or retraining run, with the paper's recipe as defaults."""
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

if TYPE_CHECKING:
    from ..secure.settings import SecureSettings

__all__ = ['RunConfig']


@dataclass
class RunConfig:
    """One run of ``timm-mpc train``, ``search`` or ``retrain``.

    Defaults follow MPCViT's CIFAR recipe (AdamW, lr 5.5e-4, weight decay 0.06, batch 128, cosine
    schedule, Mixup 0.8, CutMix 1.0, RandAugment, label smoothing 0.1); the epochs default to 300 as in the
    paper's search, and every run is resumable.
    """
    output: str = 'runs/run'
    model: str = 'mpcvit_tiny'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False  # start from the model's pretrained timm weights (and distil from them: see teacher)
    img_size: Optional[int] = None  # build the model at this input size (timm resamples a pretrained position table)
    attn_pattern: Optional[Union[str, List[Any]]] = 'softmax'
    gelu_pattern: Optional[Union[str, List[Any]]] = None
    init_from: Optional[str] = None
    pattern_from_init: bool = False
    reinit_weights: bool = False

    dataset: str = 'fashion_mnist'
    data_dir: Optional[str] = None
    download: bool = False
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    workers: int = 2

    epochs: int = 300
    batch_size: int = 128
    opt: str = 'adamw'
    lr: float = 5.5e-4
    weight_decay: float = 0.06
    sched: str = 'cosine'
    warmup_epochs: int = 10
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: Optional[float] = None
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1'
    scale: Tuple[float, float] = (0.8, 1.0)
    hflip: float = 0.5
    re_prob: float = 0.0
    drop_path: float = 0.1

    # search (MPCViT and MPCViT+)
    lam: float = 1e-5
    lam_beta: float = 0.0
    cost_weighted: bool = False
    network: str = 'lan'
    engine: str = 'crypten'
    protocol: Optional[str] = None
    mu: List[float] = field(default_factory=lambda: [0.5])
    budget_s: List[float] = field(default_factory=list)
    gelu_keep: Optional[float] = None

    # distillation: the teacher's weights; a converted timm model's teacher is its original, unconverted architecture,
    # and a retraining with pretrained and no teacher file distils from the pretrained original unless no_kd
    teacher: Optional[str] = None
    kd_alpha: float = 1.0
    no_kd: bool = False

    device: str = 'cpu'
    amp: bool = False
    amp_dtype: str = 'bfloat16'
    seed: int = 0
    resume: bool = True
    estimate_latency: bool = True

    def cost_settings(self) -> 'SecureSettings':
        """The engine and protocol whose measured costs price the run's latency estimates, budgets and
        cost-weighted penalty (checked: an unknown engine or protocol raises ValueError)."""
        from ..secure.settings import SecureSettings
        return SecureSettings(engine=self.engine, protocol=self.protocol)

    def model_args(self, num_classes: int) -> Dict[str, Any]:
        """``timm.create_model`` keyword arguments of the run's model (and its teacher)."""
        return dict(self.model_kwargs, num_classes=num_classes, **({'img_size': self.img_size} if self.img_size else {}))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> 'RunConfig':
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f'unknown run settings {unknown}; accepted: {sorted(names)}')
        return cls(**data)
