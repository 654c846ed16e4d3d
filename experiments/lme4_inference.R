#!/usr/bin/env Rscript
## Inference references for linear mixed models: lmerTest's t and F tests with Satterthwaite and
## Kenward-Roger denominator degrees of freedom, lme4's profile and Wald intervals, emmeans' marginal means
## and pairwise contrasts, a parametric bootstrap (bootMer) of sleepstudy, and InstEval's Satterthwaite
## table with its timings.
##
## Usage (from the repository root):
##   Rscript experiments/lme4_inference.R [--only NAME[,NAME...]] [--no-insteval] [--no-boot] [outdir]
##
## Models: every model of experiments/corpus_models.csv (all Gaussian; the data loaded from its R package
## as experiments/lme4_corpus.R does, with lme4_common.R's load_data), plus
##   oats_variety  nlme::Oats, yield ~ nitro + Variety + (1 | Block/Variety)   (emmeans "Variety")
##   insteval      lme4::InstEval, y ~ service + (1 | s) + (1 | d) + (1 | dept) (service is lme4's
##                 factor, so its coefficient is named service1; Satterthwaite only, no Kenward-Roger)
## Each is fitted by REML with lmerTest::lmer (lme4's default settings and contrasts: contr.treatment for
## unordered, contr.poly for ordered factors). Kenward-Roger (pbkrtest) is skipped for models with more
## than 10000 observations (pbkrtest works with dense n x n matrices) and stopped after 60 s (the limit is
## checked between R calls, so one long matrix operation can run past it); the reason is written to the
## model's info.json and to index.csv. emmeans' own default, pbkrtest.limit = 3000, makes emmeans use
## asymptotic (z) dfs above 3000 observations (only models at or below it have emmeans here).
##
## Outputs (default outdir results/lme4/inference/), per model <name>/:
##   coef_satterthwaite.csv       summary(m, ddf = "Satterthwaite")$coefficients:
##                                term, estimate, std_error, df, t, p
##   coef_kenward_roger.csv       summary(m, ddf = "Kenward-Roger")$coefficients, same columns; std_error
##                                is the Kenward-Roger adjusted one, as lmerTest reports it
##   anova_type3_satterthwaite.csv, anova_type3_kenward_roger.csv, anova_type1_satterthwaite.csv
##                                anova(m, type = 3 or 1, ddf = ...): term, sum_sq, mean_sq, num_df,
##                                den_df, F, p (no rows for an intercept-only model)
##   confint_wald.csv             confint(m, method = "Wald", oldNames = FALSE): parameter, lower, upper
##                                (NA for the variance parameters, as lme4 writes them)
##   confint_profile.csv          confint(m, method = "profile", oldNames = FALSE), small models only
##   emmeans_<f>_<ddf>.csv        summary(emmeans(m, "<f>", lmer.df = <ddf>), infer = c(TRUE, TRUE)):
##                                level, estimate, std_error, df, lower, upper, t, p; <ddf> is kr (emmeans'
##                                default for lmer fits) or satterthwaite
##   pairs_<f>_<ddf>_<adj>.csv    summary(pairs(emm, adjust = <adj>), infer = c(TRUE, TRUE)), adj in
##                                {none, tukey}: contrast, estimate, std_error, df, lower, upper, t, p
##   info.json                    formula, data set, nobs, per step its seconds (one run), error and
##                                warnings/messages, the Kenward-Roger skip reason
## and, across models:
##   index.csv                    one row per model: name, origin (corpus/extra), package, dataset,
##                                subset, formula, nobs, fit error, which outputs exist (TRUE/FALSE),
##                                emmeans factors, kr_note, fit and step seconds
##   sleepstudy_timing.json       sleepstudy (Reaction ~ Days + (Days | Subject), REML): seconds of
##                                confint(method = "profile") and of the summary/anova calls, 5 repeats
##                                each, all runs and their median
##   sleepstudy_bootmer.csv/.json bootMer(m, FUN, nsim = 1000, seed = 20240601) on the lme4::lmer fit:
##                                per parameter (fixef, sd_/cor_ terms, sigma) the estimate, bootstrap
##                                mean, SD (the bootstrap standard error), 2.5 % and 97.5 % quantiles;
##                                the JSON has the seconds of 3 runs and their median, failures, messages
##   insteval/…                   coef_satterthwaite.csv, anova_type3_satterthwaite.csv, info.json with the
##                                seconds of lme4::lmer, lmerTest::lmer, summary and anova (one run each)
##   versions.json                R and package versions
## CSV numbers are written with the shortest of 15 or 17 significant digits that reads back to the same
## double; JSON numbers carry jsonlite's 15 significant digits (digits = NA). Timings are elapsed seconds
## on the machine that ran the script (shared, so noisy).

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(pbkrtest)
  library(emmeans)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
only <- NULL
if (length(i <- which(args == "--only"))) {
  only <- strsplit(args[[i + 1]], ",")[[1]]
  args <- args[-c(i, i + 1)]
}
do_insteval <- !("--no-insteval" %in% args)
do_boot <- !("--no-boot" %in% args)
args <- setdiff(args, c("--no-insteval", "--no-boot"))
outdir <- if (length(args) >= 1) args[[1]] else file.path("results", "lme4", "inference")
dir.create(outdir, recursive = TRUE, showWarnings = FALSE)

script_dir <- function() {
  f <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(f)) dirname(normalizePath(f[[1]])) else "experiments"
}
source(file.path(script_dir(), "lme4_common.R"))   # write_json_file, load_data, write_table, capture

KR_MAX_NOBS <- 10000
KR_LIMIT_S <- 60
PROFILE_LIMIT_S <- 120

## Models with profile intervals, and the factors whose marginal means are written.
profile_models <- c("sleepstudy", "oats_variety", "penicillin", "pastes_nested", "pastes_crossed",
                    "dyestuff", "npk", "mass_oats", "ergostool", "machines")
emmeans_factors <- list(oats_variety = "Variety", mass_oats = c("V", "N"), npk = "N",
                        ergostool = "Type", machines = "Machine", machines_nested = "Machine",
                        cake_fm3 = "recipe", orthodont_sex = "Sex", assay = "sample")

## ---------------------------------------------------------------------------
## Writing
## ---------------------------------------------------------------------------

## Run `expr` as step `key` of a model: the table it returns goes to <dir>/<key>.csv; its record to `steps`.
run_step <- function(state, key, expr, limit = Inf) {
  r <- capture(expr, limit)
  state$steps[[key]] <- list(seconds = r$seconds, error = r$error, messages = as.list(r$messages))
  if (is.data.frame(r$value)) {
    write_table(r$value, file.path(state$dir, paste0(key, ".csv")))
    state$written <- c(state$written, key)
  }
  invisible(r)
}

## ---------------------------------------------------------------------------
## Tables
## ---------------------------------------------------------------------------

coef_table <- function(m, ddf) {
  cf <- summary(m, ddf = ddf)$coefficients
  if (!("df" %in% colnames(cf))) stop("lmerTest returned no df column (", ddf, ")")
  data.frame(term = rownames(cf), estimate = unname(cf[, "Estimate"]),
             std_error = unname(cf[, "Std. Error"]), df = unname(cf[, "df"]),
             t = unname(cf[, "t value"]), p = unname(cf[, "Pr(>|t|)"]), stringsAsFactors = FALSE)
}

anova_table <- function(m, type, ddf) {
  a <- anova(m, type = type, ddf = ddf)
  if (!("DenDF" %in% colnames(a))) stop("lmerTest returned no DenDF column (", ddf, ")")
  data.frame(term = rownames(a), sum_sq = a[, "Sum Sq"], mean_sq = a[, "Mean Sq"],
             num_df = a[, "NumDF"], den_df = a[, "DenDF"], F = a[, "F value"], p = a[, "Pr(>F)"],
             stringsAsFactors = FALSE)
}

confint_table <- function(m, method) {
  ci <- confint(m, method = method, oldNames = FALSE)
  data.frame(parameter = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2]),
             stringsAsFactors = FALSE)
}

## emmeans/pairs summaries with the inference columns renamed; `first` is the label column's new name.
emm_frame <- function(s, first) {
  s <- as.data.frame(s)
  lab <- if (first == "contrast") as.character(s$contrast) else as.character(s[[1]])
  lo <- grep("lower|asymp.LCL", names(s), value = TRUE)
  hi <- grep("upper|asymp.UCL", names(s), value = TRUE)
  est <- if ("emmean" %in% names(s)) s$emmean else s$estimate
  stat <- if ("t.ratio" %in% names(s)) s$t.ratio else s$z.ratio
  out <- data.frame(label = lab, estimate = est, std_error = s$SE, df = s$df,
                    lower = s[[lo]], upper = s[[hi]], t = stat, p = s$p.value,
                    stringsAsFactors = FALSE)
  names(out)[1] <- first
  out
}

## ---------------------------------------------------------------------------
## One model
## ---------------------------------------------------------------------------

## Fit by REML with lmerTest::lmer; the data lives in the formula's environment as `dat`, where
## emmeans and lmerTest look for the call's data.
fit_reml <- function(form, data) {
  env <- new.env(parent = globalenv())
  env$dat <- data
  environment(form) <- env
  eval(bquote(lmerTest::lmer(.(form), data = dat, REML = TRUE)), env)
}

kr_skip_reason <- function(spec, m) {
  if (spec$name == "insteval") return("not run: pbkrtest cannot handle InstEval's size")
  if (nobs(m) > KR_MAX_NOBS) return(sprintf("skipped: nobs = %d > %d", nobs(m), KR_MAX_NOBS))
  ""
}

run_emmeans <- function(state, m, f) {
  for (ddf in c("kr", "satterthwaite")) {
    lmer_df <- if (ddf == "kr") "kenward-roger" else "satterthwaite"
    tag <- sprintf("%s_%s", f, ddf)
    r <- run_step(state, paste0("emmeans_", tag), {
      e <- emmeans(m, f, lmer.df = lmer_df)
      emm_frame(summary(e, infer = c(TRUE, TRUE)), "level")
    }, limit = KR_LIMIT_S)
    if (is.null(r$value)) next
    e <- suppressMessages(emmeans(m, f, lmer.df = lmer_df))
    for (adj in c("none", "tukey"))
      run_step(state, sprintf("pairs_%s_%s", tag, adj),
               emm_frame(summary(pairs(e, adjust = adj), infer = c(TRUE, TRUE)), "contrast"))
  }
}

run_model <- function(spec) {
  state <- new.env()
  state$dir <- file.path(outdir, spec$name)
  state$steps <- list()
  state$written <- character(0)
  dir.create(state$dir, recursive = TRUE, showWarnings = FALSE)
  form <- as.formula(spec$formula, env = globalenv())
  data <- load_data(spec$r_package, spec$dataset, spec$subset)
  fit <- run_step(state, "fit", fit_reml(form, data))
  m <- fit$value
  kr_note <- ""
  if (!is.null(m)) {
    run_step(state, "coef_satterthwaite", coef_table(m, "Satterthwaite"))
    run_step(state, "anova_type3_satterthwaite", anova_table(m, 3, "Satterthwaite"))
    run_step(state, "anova_type1_satterthwaite", anova_table(m, 1, "Satterthwaite"))
    kr_note <- kr_skip_reason(spec, m)
    if (!nzchar(kr_note)) {
      r <- run_step(state, "coef_kenward_roger", coef_table(m, "Kenward-Roger"), limit = KR_LIMIT_S)
      if (is.null(r$value)) kr_note <- paste("failed:", r$error)
      else if (r$seconds > KR_LIMIT_S)
        kr_note <- sprintf("slow: summary took %.1f s, over the %d s limit (kept)", r$seconds, KR_LIMIT_S)
      if (!is.null(r$value)) run_step(state, "anova_type3_kenward_roger", anova_table(m, 3, "Kenward-Roger"),
                    limit = KR_LIMIT_S)
    }
    run_step(state, "confint_wald", confint_table(m, "Wald"))
    if (spec$name %in% profile_models)
      run_step(state, "confint_profile", confint_table(m, "profile"), limit = PROFILE_LIMIT_S)
    for (f in emmeans_factors[[spec$name]]) run_emmeans(state, m, f)
  }
  info <- list(name = spec$name, origin = spec$origin, r_package = spec$r_package,
               dataset = spec$dataset, subset = spec$subset, formula = spec$formula,
               reml = TRUE, nobs = if (is.null(m)) NA else nobs(m),
               fit_error = fit$error, kr_note = kr_note, steps = state$steps)
  write_json_file(info, file.path(state$dir, "info.json"))
  list(model = m, info = info, written = state$written)
}

index_row <- function(res, spec) {
  keys <- c("coef_satterthwaite", "coef_kenward_roger", "anova_type3_satterthwaite",
            "anova_type3_kenward_roger", "anova_type1_satterthwaite", "confint_wald", "confint_profile")
  row <- list(name = spec$name, origin = spec$origin, r_package = spec$r_package,
              dataset = spec$dataset, subset = spec$subset, formula = spec$formula,
              nobs = res$info$nobs, fit_error = if (is.null(res$info$fit_error)) "" else res$info$fit_error)
  for (k in keys) row[[k]] <- k %in% res$written
  row$emmeans <- paste(emmeans_factors[[spec$name]], collapse = ";")
  row$kr_note <- res$info$kr_note
  for (k in c("fit", "coef_satterthwaite", "coef_kenward_roger", "anova_type3_kenward_roger",
              "confint_profile")) {
    s <- res$info$steps[[k]]$seconds
    row[[paste0("seconds_", k)]] <- if (is.null(s)) NA else s
  }
  as.data.frame(row, stringsAsFactors = FALSE)
}

## ---------------------------------------------------------------------------
## sleepstudy extras: timings (5 repeats) and the parametric bootstrap
## ---------------------------------------------------------------------------

median_seconds <- function(expr_fun, n) {
  s <- vapply(seq_len(n), function(i) unname(system.time(expr_fun())[["elapsed"]]), numeric(1))
  list(runs = s, median = median(s))
}

sleepstudy_timing <- function(m) {
  q <- function(f) suppressWarnings(suppressMessages(f))
  out <- list(
    model = "Reaction ~ Days + (Days | Subject), REML, lmerTest::lmer",
    confint_profile = median_seconds(function() q(confint(m, method = "profile", oldNames = FALSE)), 5),
    summary_satterthwaite = median_seconds(function() summary(m, ddf = "Satterthwaite"), 5),
    summary_kenward_roger = median_seconds(function() summary(m, ddf = "Kenward-Roger"), 5),
    anova_type3_satterthwaite = median_seconds(function() anova(m, type = 3), 5),
    anova_type3_kenward_roger = median_seconds(function() anova(m, type = 3, ddf = "Kenward-Roger"), 5),
    fit_lmerTest = median_seconds(function() lmerTest::lmer(Reaction ~ Days + (Days | Subject),
                                                            data = sleepstudy), 5),
    fit_lme4 = median_seconds(function() lme4::lmer(Reaction ~ Days + (Days | Subject),
                                                    data = sleepstudy), 5))
  write_json_file(out, file.path(outdir, "sleepstudy_timing.json"))
  out
}

## Parameters in confint's oldNames = FALSE naming: fixed effects, sd_<term>|<grp>, cor_<t2>.<t1>|<grp>, sigma.
boot_stat <- function(x) {
  vc <- as.data.frame(VarCorr(x))
  re <- vc$grp != "Residual"
  nm <- ifelse(is.na(vc$var2[re]), paste0("sd_", vc$var1[re], "|", vc$grp[re]),
               paste0("cor_", vc$var2[re], ".", vc$var1[re], "|", vc$grp[re]))
  c(fixef(x), setNames(vc$sdcor[re], nm), sigma = sigma(x))
}

sleepstudy_bootmer <- function(nsim = 1000, seed = 20240601) {
  m <- lme4::lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = TRUE)
  runs <- list()
  for (i in 1:3) runs[[i]] <- capture(bootMer(m, boot_stat, nsim = nsim, seed = seed))
  b <- runs[[1]]$value
  tt <- b$t
  ok <- stats::complete.cases(tt)
  tab <- data.frame(parameter = colnames(tt), estimate = unname(b$t0),
                    boot_mean = colMeans(tt[ok, , drop = FALSE]),
                    boot_sd = apply(tt[ok, , drop = FALSE], 2, sd),
                    q025 = apply(tt[ok, , drop = FALSE], 2, quantile, 0.025, names = FALSE),
                    q975 = apply(tt[ok, , drop = FALSE], 2, quantile, 0.975, names = FALSE),
                    stringsAsFactors = FALSE)
  write_table(tab, file.path(outdir, "sleepstudy_bootmer.csv"))
  secs <- vapply(runs, function(r) r$seconds, numeric(1))
  info <- list(model = "lme4::lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = TRUE)",
               call = sprintf("bootMer(m, boot_stat, nsim = %d, seed = %d) (type = parametric, use.u = FALSE)",
                              nsim, seed),
               nsim = nsim, seed = seed, n_failed = sum(!ok), seconds_runs = secs,
               seconds_median = median(secs), messages = as.list(unique(unlist(lapply(runs, `[[`, "messages")))),
               note = "boot_sd is the SD of the nsim replicates (the bootstrap standard error); Monte Carlo noise about boot_sd / sqrt(2 * nsim) relative")
  write_json_file(info, file.path(outdir, "sleepstudy_bootmer.json"))
  list(table = tab, info = info)
}

## ---------------------------------------------------------------------------
## InstEval: Satterthwaite only, with timings of fit, summary and anova
## ---------------------------------------------------------------------------

run_insteval <- function() {
  dir <- file.path(outdir, "insteval")
  dir.create(dir, recursive = TRUE, showWarnings = FALSE)
  data(InstEval, package = "lme4", envir = environment())
  form <- y ~ service + (1 | s) + (1 | d) + (1 | dept)
  f0 <- capture(lme4::lmer(form, data = InstEval, REML = TRUE))
  f1 <- capture(lmerTest::lmer(form, data = InstEval, REML = TRUE))
  m <- f1$value
  s1 <- capture(coef_table(m, "Satterthwaite"))
  a1 <- capture(anova_table(m, 3, "Satterthwaite"))
  write_table(s1$value, file.path(dir, "coef_satterthwaite.csv"))
  write_table(a1$value, file.path(dir, "anova_type3_satterthwaite.csv"))
  st <- function(r) list(seconds = r$seconds, error = r$error, messages = as.list(r$messages))
  info <- list(name = "insteval", origin = "extra", r_package = "lme4", dataset = "InstEval", subset = "",
               formula = deparse(form), reml = TRUE, nobs = nobs(m),
               note = "service is lme4's factor (levels 0, 1): its coefficient is service1. One run per step.",
               kr_note = "not run: pbkrtest cannot handle InstEval's size",
               steps = list(fit_lme4 = st(f0), fit = st(f1), coef_satterthwaite = st(s1),
                            anova_type3_satterthwaite = st(a1)),
               timing_note = paste("fit = lmerTest::lmer, which is lme4::lmer (fit_lme4) plus lmerTest's",
                                   "Hessian/Jacobian of the variance parameters; coef_satterthwaite =",
                                   "summary(m, ddf = 'Satterthwaite'); anova = anova(m, type = 3)"))
  write_json_file(info, file.path(dir, "info.json"))
  print(s1$value)
  print(a1$value)
  cat(sprintf("InstEval: lme4 fit %.2f s, lmerTest fit %.2f s, summary %.2f s, anova %.2f s\n",
              f0$seconds, f1$seconds, s1$seconds, a1$seconds))
  data.frame(name = "insteval", origin = "extra", r_package = "lme4", dataset = "InstEval", subset = "",
             formula = deparse(form), nobs = nobs(m), fit_error = "", coef_satterthwaite = TRUE,
             coef_kenward_roger = FALSE, anova_type3_satterthwaite = TRUE,
             anova_type3_kenward_roger = FALSE, anova_type1_satterthwaite = FALSE, confint_wald = FALSE,
             confint_profile = FALSE, emmeans = "", kr_note = info$kr_note, seconds_fit = f1$seconds,
             seconds_coef_satterthwaite = s1$seconds, seconds_coef_kenward_roger = NA,
             seconds_anova_type3_kenward_roger = NA, seconds_confint_profile = NA, stringsAsFactors = FALSE)
}

## ---------------------------------------------------------------------------
## Main
## ---------------------------------------------------------------------------

pkgs <- c("lme4", "lmerTest", "pbkrtest", "emmeans", "Matrix", "nlme", "MASS", "mlmRev", "jsonlite")
write_json_file(c(list(R_version = R.version.string),
                  setNames(lapply(pkgs, function(p) as.character(packageVersion(p))), pkgs)),
                file.path(outdir, "versions.json"))

corpus <- read.csv(file.path("experiments", "corpus_models.csv"), stringsAsFactors = FALSE,
                   na.strings = character(0))
corpus$origin <- "corpus"
extras <- data.frame(name = "oats_variety", r_package = "nlme", dataset = "Oats",
                     formula = "yield ~ nitro + Variety + (1|Block/Variety)", subset = "",
                     origin = "extra", stringsAsFactors = FALSE)
specs <- rbind(corpus[, names(extras)], extras)
if (!is.null(only)) specs <- specs[specs$name %in% only, ]

index <- list()
for (r in seq_len(nrow(specs))) {
  spec <- as.list(specs[r, ])
  res <- run_model(spec)
  index[[length(index) + 1]] <- index_row(res, spec)
  cat(sprintf("%-20s nobs=%-5s fit %.2f s  KR %s  [%s]\n", spec$name, res$info$nobs,
              res$info$steps$fit$seconds, if (nzchar(res$info$kr_note)) res$info$kr_note else "ok",
              paste(res$written, collapse = ", ")))
  if (!is.null(res$info$fit_error)) cat("   fit error:", res$info$fit_error, "\n")
  if (spec$name == "sleepstudy") {
    tm <- sleepstudy_timing(res$model)
    cat(sprintf("sleepstudy profile confint: median %.3f s\n", tm$confint_profile$median))
    if (do_boot) {
      b <- sleepstudy_bootmer()
      print(b$table)
      cat(sprintf("bootMer nsim=1000: median %.2f s\n", b$info$seconds_median))
    }
  }
}
if (do_insteval && (is.null(only) || "insteval" %in% only)) index[[length(index) + 1]] <- run_insteval()
index <- do.call(rbind, index)
index_path <- file.path(outdir, "index.csv")
if (!is.null(only) && file.exists(index_path)) {
  old <- read.csv(index_path, stringsAsFactors = FALSE, na.strings = "NA")
  for (k in c("subset", "fit_error", "emmeans", "kr_note")) old[[k]][is.na(old[[k]])] <- ""
  index <- rbind(old[!(old$name %in% index$name), ], index)
  index <- index[order(match(index$name, c(corpus$name, extras$name, "insteval"))), ]
}
write_table(index, index_path)
cat(sprintf("Wrote %s (%s)\n", outdir, R.version.string))
