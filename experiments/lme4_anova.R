#!/usr/bin/env Rscript
## lme4's information criteria and likelihood-ratio tables, for lmevi's logLik/AIC/BIC/anova tests.
##
## Usage (from the repository root):
##   Rscript experiments/lme4_anova.R [outdir]
##
## Outputs, under <outdir> (default results/lme4/anova/):
##   criteria.csv   per model and fit (REML and ML): logLik, df, AIC, BIC, deviance (ML fits) and
##                  REMLcrit (REML fits), as lme4 1.1-31 reports them
##   wald.csv       per model and fit: each fixed effect's estimate, std. error (vcov) and Wald 95 %
##                  interval, confint(m, parm = "beta_", method = "Wald")
##   anova_sleepstudy.csv  anova(m0, m1, m2) for three sleepstudy models fitted with REML (lme4 refits them
##                  by ML first): npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq)

suppressPackageStartupMessages(library(lme4))

args <- commandArgs(trailingOnly = TRUE)
outdir <- if (length(args) >= 1) args[[1]] else file.path("results", "lme4", "anova")
dir.create(outdir, recursive = TRUE, showWarnings = FALSE)

data(sleepstudy, Penicillin, Pastes, Dyestuff, package = "lme4")
models <- list(
  list(name = "sleepstudy_slope", data = sleepstudy, formula = Reaction ~ Days + (Days | Subject)),
  list(name = "sleepstudy_intercept", data = sleepstudy, formula = Reaction ~ Days + (1 | Subject)),
  list(name = "penicillin", data = Penicillin, formula = diameter ~ 1 + (1 | plate) + (1 | sample)),
  list(name = "pastes", data = Pastes, formula = strength ~ 1 + (1 | batch/cask)),
  list(name = "dyestuff", data = Dyestuff, formula = Yield ~ 1 + (1 | Batch))
)

rows <- list()
wald <- list()
for (spec in models) {
  for (reml in c(TRUE, FALSE)) {
    m <- lmer(spec$formula, data = spec$data, REML = reml)
    ll <- logLik(m)
    rows[[length(rows) + 1]] <- data.frame(
      name = spec$name, reml = reml, logLik = as.numeric(ll), df = attr(ll, "df"),
      AIC = AIC(m), BIC = BIC(m),
      deviance = if (reml) NA else deviance(m),
      REMLcrit = if (reml) REMLcrit(m) else NA
    )
    ci <- confint(m, parm = "beta_", method = "Wald", level = 0.95)
    wald[[length(wald) + 1]] <- data.frame(
      name = spec$name, reml = reml, term = rownames(ci), estimate = fixef(m)[rownames(ci)],
      std_error = sqrt(diag(as.matrix(vcov(m))))[rownames(ci)], lower = ci[, 1], upper = ci[, 2]
    )
  }
}
write.csv(do.call(rbind, rows), file.path(outdir, "criteria.csv"), row.names = FALSE)
write.csv(do.call(rbind, wald), file.path(outdir, "wald.csv"), row.names = FALSE)

m0 <- lmer(Reaction ~ Days + (1 | Subject), data = sleepstudy)
m1 <- lmer(Reaction ~ Days + (Days || Subject), data = sleepstudy)
m2 <- lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy)
tab <- as.data.frame(anova(m0, m1, m2))
tab <- cbind(model = c("m0", "m1", "m2"), tab)
write.csv(tab, file.path(outdir, "anova_sleepstudy.csv"), row.names = FALSE)
print(tab)
cat(sprintf("Wrote %s\n", outdir))
