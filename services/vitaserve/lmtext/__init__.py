"""The torch-free side of the VITA-Audio LM: its config files, vocabulary layout, text tokenizer,
prompts, detokeniser, inference schedules and sampling settings. The gateway and the generator
both import it; it imports neither."""
