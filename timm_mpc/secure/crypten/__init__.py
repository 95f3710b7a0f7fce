"""The CrypTen engine: its compatibility layer, operators, backend, party, dealer, offline phase, dry run and
truncation measurement. Loaded through the engine table (:mod:`timm_mpc.secure.engines`)."""
