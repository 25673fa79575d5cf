#!/usr/bin/env bash
# Publish the registry's production version as the GitHub release model-v<N>, bundle attached,
# tagged at HEAD_SHA. A version released before must hold the same bytes.
#
# Needs: gh (GH_TOKEN), jq, the project's wine-assets. Env: GITHUB_REPOSITORY, HEAD_SHA, RUN_ID,
# RUNNER_TEMP (downloads, the bundle and the notes go there, outside the checkout).
set -euo pipefail
wine_assets=${WINE_ASSETS:-.venv/bin/wine-assets}
work="${RUNNER_TEMP:?RUNNER_TEMP must name a folder outside the checkout}/publish"
rm -rf "$work" && mkdir "$work"

version=$("$wine_assets" registry show --json | jq -r '.version')
tag="model-v${version}"
if [ "$(gh release view "$tag" --repo "$GITHUB_REPOSITORY" --json isDraft --jq '.isDraft' 2> /dev/null)" = false ]; then
  # Released before: it must hold these very bytes (import refuses a different bundle).
  gh release download "$tag" --repo "$GITHUB_REPOSITORY" --pattern "*.tar.gz" --dir "$work/released"
  for existing in "$work"/released/*.tar.gz; do "$wine_assets" registry import "$existing"; done
  echo "${tag} is already released with these model bytes: nothing new"
  exit 0
fi

# The numbering never picks a taken tag; refuse one that appeared since. matching-refs answers
# an empty list when there is none (a missing ref/ would answer 404 with a body on stdout).
ref=$(gh api "repos/${GITHUB_REPOSITORY}/git/matching-refs/tags/${tag}" \
  --jq ".[] | select(.ref == \"refs/tags/${tag}\") | .object.type + \" \" + .object.sha")
if [ "${ref%% *}" = tag ]; then  # an annotated tag: the commit it points at
  ref="commit $(gh api "repos/${GITHUB_REPOSITORY}/git/tags/${ref#* }" --jq '.object.sha')"
fi
if [ -n "$ref" ] && [ "${ref#* }" != "$HEAD_SHA" ]; then
  echo "::error::tag ${tag} exists at ${ref#* }, not at ${HEAD_SHA}"
  exit 1
fi

bundle="$work/wine-classifier-v${version}.tar.gz"
"$wine_assets" registry export "$version" --output "$bundle"
{
  echo "Released from ${HEAD_SHA} by ml-pipeline run ${RUN_ID}."
  echo
  echo '```'
  "$wine_assets" registry show "$version"
  echo '```'
} > "$work/release-notes.md"
# gh creates the tag at --target through the API together with the release: a draft, the
# upload, then publication; a failed upload deletes the draft, and no tag is left behind.
gh release create "$tag" "$bundle" --repo "$GITHUB_REPOSITORY" --target "$HEAD_SHA" \
  --title "Wine classifier v${version}" --notes-file "$work/release-notes.md"
echo "published ${tag} at ${HEAD_SHA}"
