"""bench-classic: the classic diffusion samplers and schedules for sampler-bench."""
