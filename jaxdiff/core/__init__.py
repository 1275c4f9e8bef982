"""Pure math: every function jittable and cited; imports only jax, numpy, scipy, ott-jax, diffrax and core."""
