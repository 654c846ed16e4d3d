# lme4's lmer with prior weights (and an offset) on sleepstudy: the reference of tests/test_glm_data.py.
# Run from the repository root: Rscript experiments/lme4_weights.R
# Writes results/lme4/weights/sleepstudy_weights.json.
suppressMessages(library(lme4))
library(jsonlite)
d <- sleepstudy
d$w <- d$Days + 1
d$o <- 0.5 * d$Days
one <- function(m) list(
  fixef = as.list(fixef(m)),
  sd = as.data.frame(VarCorr(m))$sdcor,
  sd_names = paste(as.data.frame(VarCorr(m))$grp, as.data.frame(VarCorr(m))$var1, as.data.frame(VarCorr(m))$var2),
  logLik = as.numeric(logLik(m)),
  REML = isREML(m),
  fitted_head = head(unname(fitted(m)), 5)
)
out <- list(
  lme4 = as.character(packageVersion("lme4")),
  formula = "Reaction ~ Days + (Days | Subject)",
  weights = "Days + 1",
  offset = "0.5 * Days",
  reml_weights = one(lmer(Reaction ~ Days + (Days | Subject), d, weights = w)),
  ml_weights = one(lmer(Reaction ~ Days + (Days | Subject), d, weights = w, REML = FALSE)),
  reml_weights_offset = one(lmer(Reaction ~ Days + (Days | Subject) + offset(o), d, weights = w))
)
dir.create("results/lme4/weights", recursive = TRUE, showWarnings = FALSE)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "results/lme4/weights/sleepstudy_weights.json")
