"""Time schedules: the diffusers-exact schedulers (one file per class mirrored) and TDM's schedule."""
