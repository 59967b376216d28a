"""Time schedules: the diffusers-exact schedulers (one file per class mirrored: DDIM, DDPM, LCM,
TCD, FlowMatchEulerDiscrete), ``scheduler_config.py`` reading a diffusers ``scheduler_config.json``
into them, and TDM's schedule."""
