#!/usr/bin/env Rscript
## lme4's side of the latency benchmark (experiments/latency.py).
##
## Usage (from the repository root):
##   Rscript experiments/lme4_latency.R import
##       library(lme4) and nothing else (the whole process is timed from Python)
##   Rscript experiments/lme4_latency.R sleepstudy
##       library(lme4), lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
##       with lme4's defaults (REML), print the variance components
##   Rscript experiments/lme4_latency.R insteval
##       library(lme4), lmer(y ~ service + (1|s) + (1|d) + (1|dept), InstEval),
##       print the variance components
##   Rscript experiments/lme4_latency.R inprocess ROWS.json
##       in one process: fit sleepstudy once, then time lmer on each row subset
##       of ROWS.json ({"keep": [[1-based row indices], ...]}), then the first
##       fits of Reaction ~ Days + (1 | Subject) and
##       Reaction ~ Days + (Days || Subject)
##   Rscript experiments/lme4_latency.R corpus [--only NAME[,NAME...]]
##       every model of experiments/corpus_models.csv, REML and ML, data
##       loaded from its R package as experiments/lme4_corpus.R loads it;
##       only the lmer calls are timed
##
## The first three modes are timed as whole processes by the caller; the
## last two print one line of JSON on stdout with their timings: wall seconds
## of each lmer call alone, after a garbage collection as system.time() does
## (the data sets are loaded outside the timings). Other output goes to
## stderr, except the printed variance components of the first modes.

args <- commandArgs(trailingOnly = TRUE)
mode <- if (length(args)) args[[1]] else ""

if (mode == "import") {
  suppressPackageStartupMessages(library(lme4))
  quit(status = 0)
}

if (mode == "sleepstudy") {
  suppressPackageStartupMessages(library(lme4))
  m <- lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy)
  print(VarCorr(m))
  quit(status = 0)
}

if (mode == "insteval") {
  suppressPackageStartupMessages(library(lme4))
  m <- lmer(y ~ service + (1 | s) + (1 | d) + (1 | dept), data = InstEval)
  print(VarCorr(m))
  quit(status = 0)
}

## ---------------------------------------------------------------------------
## Modes that report JSON
## ---------------------------------------------------------------------------

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

versions <- function() list(R_version = R.version.string,
                            lme4_version = as.character(packageVersion("lme4")))

## One lmer call timed as system.time() times it (garbage collection first,
## outside the timing) but with Sys.time()'s sub-millisecond resolution;
## warnings and messages are counted and muffled, an error is kept.
timed_fit <- function(formula, data, REML) {
  n_msgs <- 0L
  err <- ""
  invisible(gc(FALSE))
  t0 <- Sys.time()
  m <- tryCatch(
    withCallingHandlers(
      lmer(formula, data = data, REML = REML),
      warning = function(w) { n_msgs <<- n_msgs + 1L; invokeRestart("muffleWarning") },
      message = function(c) { n_msgs <<- n_msgs + 1L; invokeRestart("muffleMessage") }
    ),
    error = function(e) { err <<- conditionMessage(e); NULL }
  )
  secs <- as.numeric(difftime(Sys.time(), t0, units = "secs"))
  list(seconds = secs, ok = !is.null(m), error = err, n_messages = n_msgs)
}

json_line <- function(x) {
  cat(as.character(jsonlite::toJSON(x, auto_unbox = TRUE, digits = NA, null = "null", na = "null")), "\n",
      sep = "")
}

if (mode == "inprocess") {
  if (length(args) < 2) stop("usage: lme4_latency.R inprocess ROWS.json")
  rows <- jsonlite::fromJSON(args[[2]], simplifyVector = FALSE)
  form <- Reaction ~ Days + (Days | Subject)
  first <- timed_fit(form, sleepstudy, REML = TRUE)
  sizes <- list()
  for (keep in rows$keep) {
    idx <- as.integer(unlist(keep))
    f <- timed_fit(form, sleepstudy[idx, , drop = FALSE], REML = TRUE)
    sizes[[length(sizes) + 1]] <- list(n_rows = length(idx), seconds = f$seconds, ok = f$ok)
  }
  structures <- list()
  for (s in c("Reaction ~ Days + (1 | Subject)", "Reaction ~ Days + (Days || Subject)")) {
    f <- timed_fit(as.formula(s), sleepstudy, REML = TRUE)
    structures[[length(structures) + 1]] <- list(formula = s, seconds = f$seconds, ok = f$ok)
  }
  json_line(c(list(first_fit_seconds = first$seconds, new_sizes = sizes, new_structures = structures),
              versions()))
  quit(status = 0)
}

if (mode == "corpus") {
  only <- NULL
  if (length(i <- which(args == "--only"))) only <- strsplit(args[[i + 1]], ",")[[1]]
  models <- read.csv(file.path("experiments", "corpus_models.csv"),
                     stringsAsFactors = FALSE, na.strings = character(0))
  if (!is.null(only)) {
    bad <- setdiff(only, models$name)
    if (length(bad)) stop("unknown model(s): ", paste(bad, collapse = ", "))
    models <- models[models$name %in% only, ]
  }
  source(file.path("experiments", "lme4_common.R"))  # load_data, as experiments/lme4_corpus.R loads the data
  fits <- list()
  total <- 0
  for (r in seq_len(nrow(models))) {
    spec <- as.list(models[r, ])
    form <- as.formula(spec$formula, env = globalenv())
    data <- load_data(spec$r_package, spec$dataset, spec$subset)
    for (tag in c("reml", "ml")) {
      f <- timed_fit(form, data, REML = (tag == "reml"))
      total <- total + f$seconds
      fits[[length(fits) + 1]] <- list(name = spec$name, kind = tag, seconds = f$seconds, ok = f$ok,
                                       n_messages = f$n_messages, error = f$error)
      message(sprintf("%-20s %-4s %.3f s%s", spec$name, tag, f$seconds, if (f$ok) "" else " (error)"))
    }
  }
  json_line(c(list(fits = fits, total_seconds = total), versions()))
  quit(status = 0)
}

message("usage: Rscript experiments/lme4_latency.R import|sleepstudy|insteval|inprocess ROWS.json|corpus [--only NAMES]")
quit(status = 2)
