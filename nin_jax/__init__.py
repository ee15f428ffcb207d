"""nin-jax: Network in Network (Lin, Chen & Yan, ICLR 2014) in JAX/Flax."""

from nin_jax.models import BlockSpec
from nin_jax.models import MlpConv
from nin_jax.models import NiN
from nin_jax.models import PRESETS
from nin_jax.models import create_model

__all__ = ['BlockSpec', 'MlpConv', 'NiN', 'PRESETS', 'create_model']
__version__ = '0.1.0'
