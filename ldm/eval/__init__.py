"""Evaluation: FID / sFID / IS / precision-recall of samples and rFID / PSNR / SSIM / LPIPS of tokenizers.

Entry points (import from the modules; this package stays import-light so `ldm --help` is instant):
  ldm.eval.evaluate    evaluate_samples, evaluate_batches, evaluate_reconstruction, evaluate_pairs,
                       reference_stats, compute_stats, write_reference_stats
  ldm.eval.fid         GaussianStats, stats_from_features, frechet_distance, save_stats, load_stats
  ldm.eval.metrics     inception_score, precision_recall, psnr, ssim
  ldm.eval.extractors  EXTRACTORS, build_extractor, ModuleExtractor (inception / dinov2 / digits / any nn.Module)
  ldm.eval.inception   FIDInceptionV3, load_inception (TF-2015 FID network)
  ldm.eval.commands    `ldm eval fid|rfid|recon|stats`
"""
