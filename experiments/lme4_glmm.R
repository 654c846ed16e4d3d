#!/usr/bin/env Rscript
## Reference glmer fits (Laplace approximation, lme4's defaults) of two generalized linear mixed models
## shipped with lme4:
##
##   grouseticks  TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION), family = poisson
##   verbagg      r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item),          family = binomial
##
## Usage (from the repository root):
##   Rscript experiments/lme4_glmm.R [outroot]
##
## Outputs, under <outroot>/glmm_<name>/ (default outroot results/lme4/):
##   ranef.csv    as.data.frame(ranef(m, condVar = TRUE))
##   fixef.csv    term, estimate, std_error
##   varcorr.csv  as.data.frame(VarCorr(m))
##   fit.json     formula, family, log-likelihood (Laplace), seconds (median of 3 fits), versions, warnings

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
outroot <- if (length(args) >= 1) args[[1]] else file.path("results", "lme4")

data(grouseticks, VerbAgg, package = "lme4")
models <- list(
  list(name = "grouseticks", data = grouseticks, family = "poisson",
       formula = TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)),
  list(name = "verbagg", data = VerbAgg, family = "binomial",
       formula = r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item))
)

for (mod in models) {
  out <- file.path(outroot, paste0("glmm_", mod$name))
  dir.create(out, recursive = TRUE, showWarnings = FALSE)
  msgs <- character(0)
  seconds <- numeric(0)
  for (i in 1:3) {
    tm <- system.time(m <- withCallingHandlers(
      glmer(mod$formula, data = mod$data, family = mod$family),
      warning = function(w) { msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning") },
      message = function(e) { msgs <<- c(msgs, conditionMessage(e)); invokeRestart("muffleMessage") }))
    seconds <- c(seconds, tm[["elapsed"]])
  }
  write.csv(as.data.frame(ranef(m, condVar = TRUE)), file.path(out, "ranef.csv"), row.names = FALSE)
  fe <- summary(m)$coefficients
  write.csv(data.frame(term = rownames(fe), estimate = fe[, 1], std_error = fe[, 2]),
            file.path(out, "fixef.csv"), row.names = FALSE)
  write.csv(as.data.frame(VarCorr(m)), file.path(out, "varcorr.csv"), row.names = FALSE)
  txt <- jsonlite::toJSON(list(
    name = mod$name, formula = paste(deparse(mod$formula), collapse = " "), family = mod$family,
    loglik = as.numeric(logLik(m)), n_obs = nobs(m), seconds = median(seconds),
    lme4_version = as.character(packageVersion("lme4")), r_version = R.version.string,
    singular = isSingular(m), messages = unique(msgs)
  ), auto_unbox = TRUE, digits = NA, pretty = TRUE)
  writeLines(txt, file.path(out, "fit.json"))
  cat(mod$name, ": ", median(seconds), " s\n", sep = "")
}
