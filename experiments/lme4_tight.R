#!/usr/bin/env Rscript
## lme4 run to convergence on the full InstEval data: the same model as lme4_reference.R,
##
##   y ~ service + (1 | s) + (1 | d) + (1 | dept),   REML and ML,
##
## but with the optimiser's tolerances tightened far below lme4's defaults (nloptwrap's BOBYQA stops at
## 1e-8 in theta or in the criterion by default; the department SD is only determined to about 2e-4 there).
## Its estimates are lme4's optimum itself, to which lmevi's exact fit is compared at 1e-5 (SDs) and 1e-6
## (fixed effects) in tests/test_exact.py.
##
## Usage (from the repository root):
##   Rscript experiments/lme4_tight.R [outdir]
##
## Output (default outdir results/lme4/insteval/), for tag in {reml, ml}: tight_<tag>.json with theta, the
## SDs (s, d, dept, Residual), the fixed effects, the criterion (REML criterion or deviance), the
## optimiser's settings and evaluation count, and the default fit's numbers beside them; tight_ranef_<tag>.csv,
## as.data.frame(ranef(m, condVar = TRUE)) (grpvar, term, grp, condval, condsd).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
outdir <- if (length(args) >= 1) args[[1]] else file.path("results", "lme4", "insteval")
dir.create(outdir, recursive = TRUE, showWarnings = FALSE)

data(InstEval, package = "lme4")
InstEval$service <- as.numeric(as.character(InstEval$service))
form <- y ~ service + (1 | s) + (1 | d) + (1 | dept)

tight <- list(xtol_abs = 1e-14, ftol_abs = 1e-14, ftol_rel = 1e-15, xtol_rel = 1e-14, maxeval = 100000)

numbers <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  sd <- setNames(as.list(vc$sdcor), vc$grp)
  list(
    theta = unname(getME(m, "theta")),
    sd = sd,
    beta = as.list(fixef(m)),
    criterion = if (isREML(m)) unname(REMLcrit(m)) else unname(deviance(m)),
    evaluations = m@optinfo$feval
  )
}

for (reml in c(TRUE, FALSE)) {
  tag <- if (reml) "reml" else "ml"
  default <- lmer(form, data = InstEval, REML = reml)
  t0 <- proc.time()[["elapsed"]]
  m <- lmer(form, data = InstEval, REML = reml,
            control = lmerControl(optimizer = "nloptwrap", optCtrl = tight, calc.derivs = FALSE))
  seconds <- proc.time()[["elapsed"]] - t0
  out <- c(numbers(m), list(
    model = "y ~ service + (1 | s) + (1 | d) + (1 | dept)",
    reml = reml,
    optimizer = "nloptwrap (NLOPT_LN_BOBYQA)",
    optCtrl = tight,
    seconds = round(seconds, 2),
    default_fit = numbers(default),
    lme4 = as.character(packageVersion("lme4")),
    R = R.version.string
  ))
  re <- as.data.frame(ranef(m, condVar = TRUE))
  re$grp <- as.character(re$grp)
  write.csv(re, file.path(outdir, sprintf("tight_ranef_%s.csv", tag)), row.names = FALSE)
  path <- file.path(outdir, sprintf("tight_%s.json", tag))
  writeLines(jsonlite::toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), path)
  cat(sprintf("%s: criterion %.6f (default %.6f), %d evaluations, %.1f s -> %s\n", tag, out$criterion,
              out$default_fit$criterion, out$evaluations, seconds, path))
}
