## Shared helpers of the lme4 reference scripts (lme4_reference.R, lme4_datasets.R, lme4_corpus.R,
## lme4_latency.R, lme4_inference.R, lme4_glmer.R):
## fit with lmer while collecting warnings and messages, and write the fit in the layouts of lme4's
## as.data.frame methods plus a JSON summary; load a corpus data set. Sourced, not run.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

## JSON output (Debian: r-cran-jsonlite, installed with r-cran-lme4's suggested packages or on its own)
write_json_file <- function(x, path) {
  txt <- jsonlite::toJSON(x, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null")
  writeLines(txt, path)
}

## ---------------------------------------------------------------------------
## Numbers and steps (lme4_inference.R, lme4_glmer.R)
## ---------------------------------------------------------------------------

## Shortest of %.15g / %.17g that reads back to the same double.
fmt_num <- function(x) {
  s <- sprintf("%.15g", x)
  fin <- which(is.finite(x))
  bad <- fin[as.numeric(s[fin]) != x[fin]]
  s[bad] <- sprintf("%.17g", x[bad])
  s[is.na(x)] <- NA
  s
}

write_table <- function(df, path) {
  num <- vapply(df, is.numeric, logical(1))
  for (j in which(num)) df[[j]] <- fmt_num(df[[j]])
  write.csv(df, path, row.names = FALSE, quote = which(!num), na = "NA")
}

## ---------------------------------------------------------------------------
## Running a step: value, elapsed seconds, error and every warning/message; optional time limit
## ---------------------------------------------------------------------------

capture <- function(expr, limit = Inf) {
  msgs <- character(0)
  err <- NULL
  tm <- system.time(
    val <- tryCatch({
      setTimeLimit(elapsed = limit, transient = TRUE)
      withCallingHandlers(expr,
        warning = function(w) {
          msgs <<- c(msgs, paste0("warning: ", conditionMessage(w)))
          invokeRestart("muffleWarning")
        },
        message = function(c) {
          msgs <<- c(msgs, paste0("message: ", trimws(conditionMessage(c))))
          invokeRestart("muffleMessage")
        })
    }, error = function(e) {
      err <<- conditionMessage(e)
      NULL
    }, finally = setTimeLimit(elapsed = Inf))
  )
  list(value = val, error = err, seconds = round(unname(tm[["elapsed"]]), 3),
       messages = unique(gsub("\n", " ", msgs)))
}


## ---------------------------------------------------------------------------
## Fitting and writing
## ---------------------------------------------------------------------------

## Fit with lmer, timing the call and collecting every warning and message
## (convergence warnings, "boundary (singular) fit", rank deficiency, ...); an error is kept, not raised.
## `control`: lmerControl() settings (lme4's defaults unless given; lme4_corpus.R --tight tightens BOBYQA).
fit_lmer <- function(formula, data, REML, control = lmerControl()) {
  r <- capture(lmer(formula, data = data, REML = REML, control = control))
  m <- r$value
  msgs <- r$messages
  if (!is.null(m)) {
    conv <- m@optinfo$conv$lme4$messages
    if (length(conv)) msgs <- c(msgs, paste0("optinfo: ", conv))
  }
  list(model = m, error = r$error, seconds = r$seconds, messages = unique(msgs))
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

## A corpus data set (experiments/corpus_models.csv) as a plain data.frame (groupedData and tibble classes and
## their formula attributes dropped; columns unchanged).
load_data <- function(package, dataset, subset) {
  env <- new.env()
  data(list = dataset, package = package, envir = env)
  df <- env[[dataset]]
  df <- as.data.frame(df)
  attrs <- attributes(df)
  attributes(df) <- attrs[c("names", "row.names")]
  class(df) <- "data.frame"
  if (nzchar(subset)) {
    keep <- eval(str2lang(subset), df, parent.frame())
    df <- df[keep & !is.na(keep), , drop = FALSE]
  }
  rownames(df) <- NULL
  df
}
