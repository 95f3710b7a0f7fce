"""The SPU engine (SecretFlow SPU 0.9.5): its runtime, operators and party. Loaded through the engine table
(:mod:`timm_mpc.secure.engines`); needs the ``[spu]`` extra."""
