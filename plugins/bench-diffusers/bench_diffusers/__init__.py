"""bench-diffusers: diffusers' schedulers as sampler-bench samplers, on any bench Denoiser."""
