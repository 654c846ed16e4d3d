#!/usr/bin/env Rscript
## Reference lme4 fits on small data sets shipped with lme4, each fitted with
## REML = TRUE and REML = FALSE using the default lmer settings:
##
##   sleepstudy_slope      Reaction ~ Days + (Days | Subject)      sleepstudy
##   sleepstudy_intercept  Reaction ~ Days + (1 | Subject)         sleepstudy
##   penicillin            diameter ~ 1 + (1 | plate) + (1 | sample)  Penicillin
##   pastes                strength ~ 1 + (1 | batch/cask)         Pastes
##   dyestuff              Yield ~ 1 + (1 | Batch)                 Dyestuff
##
## Usage (from the repository root):
##   Rscript experiments/lme4_datasets.R [outroot]
##
## Outputs, under <outroot>/<name>/ (default outroot results/lme4/), with the
## same layout as experiments/lme4_reference.R, for tag in {reml, ml}:
##   ranef_<tag>.csv    as.data.frame(ranef(m, condVar = TRUE))
##   fixef_<tag>.csv    term, estimate, std_error
##   varcorr_<tag>.csv  as.data.frame(VarCorr(m))
##   fit_<tag>.json     log-likelihood, criterion, ngrps(m), timing, versions,
##                      optimizer, isSingular(m) and any warnings/messages
## and <outroot>/models.csv listing name, dataset and formula of these models
## and of the InstEval model fitted by experiments/lme4_reference.R.

suppressPackageStartupMessages(library(lme4))

args <- commandArgs(trailingOnly = TRUE)
outroot <- if (length(args) >= 1) args[[1]] else file.path("results", "lme4")
dir.create(outroot, recursive = TRUE, showWarnings = FALSE)

## Shared helpers (fit_lmer, write_fit, summarise_fit) live next to this script.
script_dir <- function() {
  f <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(f)) dirname(normalizePath(f[[1]])) else "experiments"
}
source(file.path(script_dir(), "lme4_common.R"))

## ---------------------------------------------------------------------------
## Main
## ---------------------------------------------------------------------------

data(sleepstudy, Penicillin, Pastes, Dyestuff, package = "lme4")

models <- list(
  list(name = "sleepstudy_slope", dataset = "sleepstudy", data = sleepstudy,
       formula = Reaction ~ Days + (Days | Subject)),
  list(name = "sleepstudy_intercept", dataset = "sleepstudy", data = sleepstudy,
       formula = Reaction ~ Days + (1 | Subject)),
  list(name = "penicillin", dataset = "Penicillin", data = Penicillin,
       formula = diameter ~ 1 + (1 | plate) + (1 | sample)),
  list(name = "pastes", dataset = "Pastes", data = Pastes,
       formula = strength ~ 1 + (1 | batch/cask)),
  list(name = "dyestuff", dataset = "Dyestuff", data = Dyestuff,
       formula = Yield ~ 1 + (1 | Batch))
)

deparse1l <- function(f) paste(deparse(f, width.cutoff = 500L), collapse = " ")

for (spec in models) {
  outdir <- file.path(outroot, spec$name)
  dir.create(outdir, recursive = TRUE, showWarnings = FALSE)
  cat(sprintf("\n##### %s: %s on %s (%d rows)\n", spec$name,
              deparse1l(spec$formula), spec$dataset, nrow(spec$data)))
  for (tag in c("reml", "ml")) {
    fit <- fit_lmer(spec$formula, spec$data, REML = (tag == "reml"))
    write_fit(fit, spec$formula, tag, outdir)
    summarise_fit(fit, tag)
  }
}

index <- data.frame(
  name = c(vapply(models, `[[`, character(1), "name"), "insteval"),
  dataset = c(vapply(models, `[[`, character(1), "dataset"), "InstEval"),
  formula = c(vapply(models, function(s) deparse1l(s$formula), character(1)),
              "y ~ service + (1 | s) + (1 | d) + (1 | dept)"),
  stringsAsFactors = FALSE
)
write.csv(index, file.path(outroot, "models.csv"), row.names = FALSE)
cat(sprintf("\nWrote results under %s\n", outroot))
