"""persd-online: online Personalised Distillation (PERsD) of a teacher LLM into a small code student."""

__version__ = "0.1.0"
