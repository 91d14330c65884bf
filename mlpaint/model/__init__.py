"""The model's arithmetic, shared by training, publishing and serving: the feature stages
(`features`, their names apart in `feature_stages` so parsing a spec compiles nothing), raw
scores walked through LightGBM's trees (`treepredict`), exact TreeSHAP (`treeshap`) and the
explanations built on it (`explain`)."""
