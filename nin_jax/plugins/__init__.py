"""Optional accelerated layers for nin-jax, installed by extras.

Nothing in nin_jax imports a plugin at module level: `nin_jax.conv_select`
loads one lazily when a config asks for it.
"""
