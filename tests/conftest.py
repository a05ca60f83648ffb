"""Tiny-model tests are dominated by thread start-up, not arithmetic: one thread is faster and steadier under load."""
import torch

torch.set_num_threads(1)
