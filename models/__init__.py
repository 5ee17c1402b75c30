"""Twin models: the mechanistic UVA/Padova simulator and the learned glucose surrogates."""
