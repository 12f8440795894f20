"""S4D (diagonal structured SSM with HiPPO-derived initialisation): token-loop reference, FFT
convolution mode, recurrent decode step, and the paper's initialisations."""
from .common import cexpm1, discretize
from .conv import causal_fft_conv, s4d_conv, s4d_kernel
from .init import S4D_INITS, hippo_legs, legs_diagonal, s4d_init, s4d_init_log_dt
from .interface import S4D_IMPLS, s4d, s4d_step
from .reference import s4d_reference, s4d_step_reference

__all__ = ["S4D_IMPLS", "S4D_INITS", "causal_fft_conv", "cexpm1", "discretize", "hippo_legs", "legs_diagonal",
           "s4d", "s4d_conv", "s4d_init", "s4d_init_log_dt", "s4d_kernel", "s4d_reference", "s4d_step",
           "s4d_step_reference"]
