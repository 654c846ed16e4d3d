#!/usr/bin/env Rscript
## Wall-clock timing of lme4::lmer for the crossed random-intercept model
##
##   y ~ service + (1 | s) + (1 | d) + (1 | dept),  REML = TRUE
##
## Usage (from the repository root):
##   Rscript experiments/lme4_timing.R [--repeats N] [--warmup K] [--csv path.csv]
##
##   --repeats N   number of timed fits (default 5)
##   --warmup K    untimed fits run first (default 0)
##   --csv PATH    fit a CSV with columns y, service, s, d, dept instead of
##                 lme4's InstEval; s, d and dept are converted to factors
##
## Without --csv the model is fitted on lme4::InstEval with `service`
## converted from its "0"/"1" factor to numeric 0/1. Data loading and
## conversion are not part of the timings; each timing is
## system.time(lmer(...))[["elapsed"]] with default lmer settings.
##
## Prints exactly one line of JSON on stdout, e.g.
##   {"seconds":[24.1,...],"n_obs":73421,"R_version":"...","lme4_version":"...",
##    "blas":"...","lapack":"...",...}
## All other output (package messages, progress, lme4 warnings) goes to stderr.

suppressPackageStartupMessages(library(lme4))

usage <- function() {
  message("usage: Rscript experiments/lme4_timing.R [--repeats N] [--warmup K] [--csv path.csv]")
  quit(status = 2)
}

parse_args <- function(args) {
  opts <- list(repeats = 5L, warmup = 0L, csv = NULL)
  i <- 1L
  while (i <= length(args)) {
    a <- args[[i]]
    if (a %in% c("-h", "--help")) usage()
    if (grepl("=", a, fixed = TRUE) && startsWith(a, "--")) {
      key <- sub("=.*$", "", a)
      val <- sub("^[^=]*=", "", a)
    } else {
      key <- a
      if (i + 1L > length(args)) usage()
      val <- args[[i + 1L]]
      i <- i + 1L
    }
    if (key == "--repeats") opts$repeats <- as.integer(val)
    else if (key == "--warmup") opts$warmup <- as.integer(val)
    else if (key == "--csv") opts$csv <- val
    else { message("unknown argument: ", key); usage() }
    i <- i + 1L
  }
  if (is.na(opts$repeats) || opts$repeats < 1L) { message("--repeats must be >= 1"); usage() }
  if (is.na(opts$warmup) || opts$warmup < 0L) { message("--warmup must be >= 0"); usage() }
  opts
}

json_scalar <- function(x) {
  if (is.null(x) || length(x) == 0 || is.na(x)) return("null")
  if (is.logical(x)) return(if (x) "true" else "false")
  if (is.numeric(x)) return(sprintf("%.17g", x))
  s <- as.character(x)
  s <- gsub("\\\\", "\\\\\\\\", s)
  s <- gsub("\"", "\\\\\"", s)
  s <- gsub("\n", "\\\\n", s)
  s <- gsub("\t", "\\\\t", s)
  paste0("\"", s, "\"")
}

## One-line JSON: named list -> object; vectors wrapped in I() -> arrays.
to_json_line <- function(x) {
  if (requireNamespace("jsonlite", quietly = TRUE))
    return(as.character(jsonlite::toJSON(x, auto_unbox = TRUE, digits = NA,
                                         null = "null", na = "null")))
  items <- vapply(names(x), function(k) {
    v <- x[[k]]
    val <- if (inherits(v, "AsIs") || length(v) > 1)
      paste0("[", paste(vapply(unclass(v), json_scalar, character(1)), collapse = ","), "]")
    else json_scalar(v)
    paste0(json_scalar(k), ":", val)
  }, character(1))
  paste0("{", paste(items, collapse = ","), "}")
}

blas_info <- function() {
  blas <- tryCatch(unname(extSoftVersion()[["BLAS"]]), error = function(e) "")
  lapack <- tryCatch(La_library(), error = function(e) "")
  if (!nzchar(blas)) blas <- lapack
  list(blas = blas, lapack = lapack,
       lapack_version = tryCatch(La_version(), error = function(e) ""))
}

opts <- parse_args(commandArgs(trailingOnly = TRUE))

if (is.null(opts$csv)) {
  data(InstEval, package = "lme4")
  dat <- InstEval
  dat$service <- as.numeric(as.character(dat$service))
  source_name <- "lme4::InstEval"
} else {
  dat <- read.csv(opts$csv)
  missing_cols <- setdiff(c("y", "service", "s", "d", "dept"), names(dat))
  if (length(missing_cols)) stop("CSV lacks columns: ", paste(missing_cols, collapse = ", "))
  dat$y <- as.numeric(dat$y)
  dat$service <- as.numeric(dat$service)
  dat$s <- factor(dat$s)
  dat$d <- factor(dat$d)
  dat$dept <- factor(dat$dept)
  source_name <- normalizePath(opts$csv)
}

form <- y ~ service + (1 | s) + (1 | d) + (1 | dept)

## lme4 warnings and messages are reported on stderr, never on stdout.
fit_once <- function() {
  msgs <- character(0)
  tm <- system.time(
    m <- withCallingHandlers(
      lmer(form, data = dat, REML = TRUE),
      warning = function(w) {
        msgs <<- c(msgs, conditionMessage(w)); invokeRestart("muffleWarning")
      },
      message = function(c) {
        msgs <<- c(msgs, trimws(conditionMessage(c))); invokeRestart("muffleMessage")
      }
    )
  )
  for (msg in unique(msgs)) message("lme4: ", msg)
  list(seconds = round(unname(tm[["elapsed"]]), 3), model = m, messages = unique(msgs))
}

message(sprintf("timing lmer on %s: %d rows, %d warmup + %d timed fits",
                source_name, nrow(dat), opts$warmup, opts$repeats))
for (k in seq_len(opts$warmup)) {
  r <- fit_once()
  message(sprintf("  warmup %d: %.3f s", k, r$seconds))
}
seconds <- numeric(opts$repeats)
all_msgs <- character(0)
for (k in seq_len(opts$repeats)) {
  r <- fit_once()
  seconds[k] <- r$seconds
  all_msgs <- unique(c(all_msgs, r$messages))
  message(sprintf("  repeat %d: %.3f s", k, r$seconds))
}

bi <- blas_info()
out <- list(
  seconds = I(seconds),
  n_obs = nobs(r$model),
  data = source_name,
  formula = paste(deparse(form, width.cutoff = 500L), collapse = " "),
  reml = TRUE,
  warmup = opts$warmup,
  logLik = as.numeric(logLik(r$model)),
  R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  blas = bi$blas,
  lapack = bi$lapack,
  lapack_version = bi$lapack_version,
  messages = I(all_msgs)
)
cat(to_json_line(out), "\n", sep = "")
