"""The jobs, one module each: pretraining, SFT, DPO, classification, evaluation. A job never imports another job."""
