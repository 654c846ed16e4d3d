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

## ---------------------------------------------------------------------------
## JSON helpers (jsonlite if available, otherwise a small hand-written encoder)
## ---------------------------------------------------------------------------

json_scalar <- function(x) {
  if (is.null(x) || length(x) == 0) return("null")
  if (is.na(x)) return("null")
  if (is.logical(x)) return(if (x) "true" else "false")
  if (is.numeric(x)) return(sprintf("%.17g", x))
  s <- as.character(x)
  s <- gsub("\\\\", "\\\\\\\\", s)
  s <- gsub("\"", "\\\\\"", s)
  s <- gsub("\n", "\\\\n", s)
  s <- gsub("\t", "\\\\t", s)
  paste0("\"", s, "\"")
}

## Named lists -> objects, unnamed lists -> arrays, length-1 atomics -> scalars.
to_json_manual <- function(x, indent = 0) {
  pad <- strrep("  ", indent + 1)
  end <- strrep("  ", indent)
  if (is.list(x)) {
    if (length(x) == 0) return(if (is.null(names(x))) "[]" else "{}")
    items <- vapply(x, to_json_manual, character(1), indent = indent + 1)
    if (!is.null(names(x))) {
      items <- paste0(vapply(names(x), json_scalar, character(1)), ": ", items)
      return(paste0("{\n", pad, paste(items, collapse = paste0(",\n", pad)), "\n", end, "}"))
    }
    return(paste0("[\n", pad, paste(items, collapse = paste0(",\n", pad)), "\n", end, "]"))
  }
  if (length(x) == 1) return(json_scalar(x))
  paste0("[", paste(vapply(x, json_scalar, character(1)), collapse = ", "), "]")
}

write_json_file <- function(x, path) {
  if (requireNamespace("jsonlite", quietly = TRUE)) {
    txt <- jsonlite::toJSON(x, auto_unbox = TRUE, digits = NA, pretty = TRUE,
                            null = "null", na = "null")
  } else {
    txt <- to_json_manual(x)
  }
  writeLines(txt, path)
}

## ---------------------------------------------------------------------------
## Fitting and writing
## ---------------------------------------------------------------------------

## Fit with lmer, timing the call and collecting every warning and message
## (e.g. convergence warnings or "boundary (singular) fit").
fit_lmer <- function(formula, data, REML) {
  msgs <- character(0)
  m <- NULL
  tm <- system.time(
    m <- withCallingHandlers(
      lmer(formula, data = data, REML = REML),
      warning = function(w) {
        msgs <<- c(msgs, paste0("warning: ", conditionMessage(w)))
        invokeRestart("muffleWarning")
      },
      message = function(c) {
        msgs <<- c(msgs, paste0("message: ", trimws(conditionMessage(c))))
        invokeRestart("muffleMessage")
      }
    )
  )
  ## Convergence messages stored on the fitted object (they are usually also
  ## raised as warnings above; keep both, de-duplicated).
  conv <- m@optinfo$conv$lme4$messages
  if (length(conv)) msgs <- c(msgs, paste0("optinfo: ", conv))
  list(model = m, seconds = round(unname(tm[["elapsed"]]), 3), messages = unique(msgs))
}

write_fit <- function(fit, formula, tag, outdir) {
  m <- fit$model
  reml <- isREML(m)

  re <- as.data.frame(ranef(m, condVar = TRUE))
  re$grp <- as.character(re$grp)
  write.csv(re, file.path(outdir, sprintf("ranef_%s.csv", tag)), row.names = FALSE)

  cf <- summary(m)$coefficients
  fe <- data.frame(term = rownames(cf),
                   estimate = unname(cf[, "Estimate"]),
                   std_error = unname(cf[, "Std. Error"]),
                   stringsAsFactors = FALSE)
  write.csv(fe, file.path(outdir, sprintf("fixef_%s.csv", tag)), row.names = FALSE)

  vc <- as.data.frame(VarCorr(m))
  write.csv(vc, file.path(outdir, sprintf("varcorr_%s.csv", tag)), row.names = FALSE)

  crit <- if (reml) unname(REMLcrit(m)) else unname(deviance(m))
  info <- list(
    formula = paste(deparse(formula, width.cutoff = 500L), collapse = " "),
    reml = reml,
    logLik = as.numeric(logLik(m)),
    deviance_or_reml_criterion = crit,
    criterion = if (reml) "REML criterion (-2 * restricted log-likelihood)" else "deviance (-2 * log-likelihood)",
    nobs = nobs(m),
    ngrps = as.list(ngrps(m)),
    fit_seconds = fit$seconds,
    R_version = R.version.string,
    lme4_version = as.character(packageVersion("lme4")),
    optimizer = m@optinfo$optimizer,
    optimizer_conv_code = m@optinfo$conv$opt,
    singular = isSingular(m),
    theta = as.list(getME(m, "theta")),
    sigma = sigma(m),
    converged_messages = as.list(fit$messages)
  )
  write_json_file(info, file.path(outdir, sprintf("fit_%s.json", tag)))
  invisible(info)
}

summarise_fit <- function(fit, tag) {
  m <- fit$model
  cat(sprintf("== %s ==  (%.2f s)\n", toupper(tag), fit$seconds))
  cat(sprintf("logLik = %.6f   criterion = %.6f   nobs = %d\n",
              as.numeric(logLik(m)),
              if (isREML(m)) REMLcrit(m) else deviance(m), nobs(m)))
  cf <- summary(m)$coefficients
  for (i in seq_len(nrow(cf)))
    cat(sprintf("  fixef %-12s % .8f  (se %.8f)\n", rownames(cf)[i], cf[i, 1], cf[i, 2]))
  vc <- as.data.frame(VarCorr(m))
  for (i in seq_len(nrow(vc))) {
    lab <- paste(na.omit(c(vc$grp[i], vc$var1[i], vc$var2[i])), collapse = " ")
    kind <- if (is.na(vc$var2[i])) "sd" else "cor"
    cat(sprintf("  %-5s %-28s % .8f\n", kind, lab, vc$sdcor[i]))
  }
  if (length(fit$messages)) cat("  messages:", paste(fit$messages, collapse = " | "), "\n")
  else cat("  messages: none\n")
}

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
