"""Evaluation: feature extractors (offline weights), Frechet distance, KID, IS, PRDC.

    genkit eval fid --real recipe:ddpm_digits --fake runs/ddpm_digits --features digits --n 1000

`engine` turns SPECs into features and metrics with the protocol recorded; `frechet` holds
the exact float64 Frechet engine; `stats` the reference-statistics files; `features` the
registered extractors (inception tf / pytorch-fid, clip, dinov2, digits).
"""
